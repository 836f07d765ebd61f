/* Token ids from the JSON text of a request body, without a Python int per token.
 *
 * POST /score_tokens carries thousands of token ids; decoding them with msgspec makes a Python
 * int each and a list, which costs more than hashing them with the compiled chain
 * (kvcache.hashing._chain). The HTTP layer decodes the body with ``token_ids`` left as
 * msgspec.Raw and hands that text here, which returns the ids as native u32 bytes (an ndarray
 * view in Python, read as it is by the hashing kernel).
 *
 * Only the plain form is accepted: ``[`` ints separated by commas ``]`` with JSON whitespace,
 * each int in [0, 2**32) written without sign, fraction, exponent or leading zeros. Anything else
 * raises ValueError and the HTTP layer decodes the body with msgspec instead, so every error
 * message (and every odd but valid spelling such as -0) stays msgspec's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

/* Reads the number at p when at least 8 bytes are readable there; returns its length in digits
 * (0 when p is no digit; 8 when it may be longer: the caller reads those one digit at a time).
 * Branch-free in the number's length, which varies at random from one token id to the next:
 * a byte b is a digit iff (b - '0') < 10, tested in all 8 bytes at once (borrows and carries
 * only travel upwards, from the first non-digit on, so the bytes below it are exact). */
static inline int swar_number(const char *p, uint32_t *value) {
    uint64_t x;
    memcpy(&x, p, 8);
#if !PY_LITTLE_ENDIAN
    x = __builtin_bswap64(x);
#endif
    uint64_t lo = x - 0x3030303030303030ull;
    uint64_t stop = ((lo + 0x7676767676767676ull) | lo) & 0x8080808080808080ull;
    if (stop == 0) return 8;
    int len = __builtin_ctzll(stop) >> 3;
    if (len == 0) return 0;
    /* The digits to the top bytes, most significant first: zeros below act as leading zeros. */
    uint64_t v = lo << (8 * (8 - len));
    v = (v * 10 + (v >> 8)) & 0x00FF00FF00FF00FFull;    /* pairs: 0..99 */
    v = (v * 100 + (v >> 16)) & 0x0000FFFF0000FFFFull;  /* quads: 0..9999 */
    *value = (uint32_t)((v * 10000 + (v >> 32)) & 0xFFFFFFFFull);
    return len;
}

/* Reads the id at *pp (digits only, no leading zero, below 2**32) and moves past it. */
static inline int read_number(const char **pp, const char *end, uint32_t *value) {
    const char *p = *pp;
    int len = end - p >= 8 ? swar_number(p, value) : 8;
    if (len == 8) { /* 8 digits or more, or near the end: one digit at a time */
        uint64_t v = 0;
        len = 0;
        while (p + len < end && (unsigned)(p[len] - '0') <= 9) {
            v = v * 10 + (uint64_t)(p[len++] - '0');
            if (v > UINT32_MAX) return -1; /* at most 11 digits get here: no overflow */
        }
        *value = (uint32_t)v;
    }
    if (len == 0 || (*p == '0' && len > 1)) return -1; /* a leading zero is not JSON */
    *pp = p + len;
    return 0;
}

/* After an id: past whitespace, ',' and whitespace to where the next id must start (returns
 * 1), or past whitespace and ']' (returns 0). -1 for anything else, e.g. the '.' or 'e' of a
 * float. */
static inline int next_item(const char **pp, const char *end) {
    const char *p = skip_ws(*pp, end);
    if (p == end) return -1;
    if (*p == ',') {
        *pp = skip_ws(p + 1, end);
        return 1;
    }
    if (*p == ']') {
        *pp = p + 1;
        return 0;
    }
    return -1;
}

/* One id of a segment at *pp, then past whitespace and either the segment's end (returns 0)
 * or a ',' and whitespace to where the next id must start (returns 1); -1 if not plain.
 * A segment ends at a ',' or at the array's ']', never at a digit, so ids stop there. */
static inline int segment_step(const char **pp, const char *seg_end, const char *end,
                               uint32_t *value) {
    if (read_number(pp, end, value) < 0) return -1;
    const char *p = skip_ws(*pp, seg_end);
    if (p == seg_end) return 0;
    if (*p != ',') return -1;
    p = skip_ws(p + 1, seg_end);
    if (p == seg_end) return -1; /* ",]" or ",," across the segment's end */
    *pp = p;
    return 1;
}

/* Parses the array starting at p (after any whitespace) into out; returns the count and sets
 * *after just past its ']', or returns -1 if it is not of the plain form.
 *
 * One id's position depends on the previous id's length, a chain of dependent loads that bounds
 * a single cursor (finding the ids 64 bytes at a time from SIMD digit masks measured no faster:
 * the per-id work bounds it). So the array is cut at commas into SEGMENTS pieces parsed in
 * lockstep: independent chains the CPU overlaps. Each writes to its own stretch of out (an
 * upper bound of its count apart), compacted at the end. A plain array holds only digits,
 * whitespace and commas, so its end is the first ']'. */
#define SEGMENTS 4
#define MIN_SEGMENT 16 /* bytes: shorter arrays are cut into fewer pieces */

static Py_ssize_t parse(const char *p, const char *end, uint32_t *out, const char **after) {
    p = skip_ws(p, end);
    if (p == end || *p++ != '[') return -1;
    p = skip_ws(p, end);
    if (p < end && *p == ']') {
        *after = p + 1;
        return 0;
    }
    const char *close = memchr(p, ']', (size_t)(end - p));
    if (close == NULL) return -1;
    const char *cursor[SEGMENTS], *seg_end[SEGMENTS];
    Py_ssize_t base[SEGMENTS], count[SEGMENTS];
    int live[SEGMENTS], segments = 0;
    Py_ssize_t length = close - p, slot = 0;
    Py_ssize_t pieces = length / MIN_SEGMENT < SEGMENTS ? length / MIN_SEGMENT : SEGMENTS;
    const char *from = p;
    for (Py_ssize_t k = 1; k <= pieces || segments == 0; k++) {
        /* This segment ends at the first comma past its share of the array (or at ']'). */
        const char *to = NULL, *aim = p + length * k / (pieces ? pieces : 1);
        if (k < pieces && aim > from) to = memchr(aim, ',', (size_t)(close - aim));
        if (to == NULL) to = close;
        const char *q = skip_ws(from, to);
        if (q == to) return -1; /* nothing between two commas, or after '[' / before ']' */
        cursor[segments] = q;
        seg_end[segments] = to;
        base[segments] = slot;
        count[segments] = 0;
        live[segments] = 1;
        slot += (to - from + 1) / 2 + 1; /* ids are >= 1 digit apart by >= 1 comma */
        segments++;
        if (to == close) break;
        from = to + 1; /* past the comma */
    }
    if (segments == SEGMENTS) { /* the usual case, while every segment has ids left */
        for (;;) {
            int m0 = segment_step(&cursor[0], seg_end[0], end, &out[base[0] + count[0]++]);
            int m1 = segment_step(&cursor[1], seg_end[1], end, &out[base[1] + count[1]++]);
            int m2 = segment_step(&cursor[2], seg_end[2], end, &out[base[2] + count[2]++]);
            int m3 = segment_step(&cursor[3], seg_end[3], end, &out[base[3] + count[3]++]);
            if ((m0 | m1 | m2 | m3) < 0) return -1;
            if (!(m0 & m1 & m2 & m3)) {
                live[0] = m0, live[1] = m1, live[2] = m2, live[3] = m3;
                break;
            }
        }
    }
    int active = 0;
    for (int k = 0; k < segments; k++) active += live[k];
    while (active > 0) {
        for (int k = 0; k < segments; k++) {
            if (!live[k]) continue;
            int more = segment_step(&cursor[k], seg_end[k], end, &out[base[k] + count[k]++]);
            if (more < 0) return -1;
            if (more == 0) {
                live[k] = 0;
                active--;
            }
        }
    }
    Py_ssize_t n = count[0];
    for (int k = 1; k < segments; k++) {
        memmove(out + n, out + base[k], (size_t)count[k] * sizeof *out);
        n += count[k];
    }
    *after = close + 1;
    return n;
}

/* From this many bytes of text on, the parse runs with the GIL released (~4 ns an id). */
#define NOGIL_BYTES 4096

/* The ids of the array at text[offset:] as native u32 bytes; NULL with ValueError if it is not
 * a plain array or (whole) text does not end after it. */
static PyObject *ids_at(const char *text, Py_ssize_t len, Py_ssize_t offset, int whole,
                        Py_ssize_t *stop) {
    /* Every id takes a digit and a separator but the last: an upper bound on the count. */
    Py_ssize_t cap = (len - offset) / 2 + 1 + SEGMENTS;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap * 4);
    if (out == NULL) return NULL;
    const char *end = text + len, *after = NULL;
    uint32_t *ids = (uint32_t *)PyBytes_AS_STRING(out);
    Py_ssize_t n;
    if (len - offset >= NOGIL_BYTES) {
        /* Pure C over an immutable body and a fresh buffer: other threads run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        n = parse(text + offset, end, ids, &after);
        Py_END_ALLOW_THREADS
    } else {
        n = parse(text + offset, end, ids, &after);
    }
    if (n < 0 || (whole && skip_ws(after, end) != end)) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "not a plain JSON array of u32 ints");
        return NULL;
    }
    *stop = after - text;
    if (n < cap && _PyBytes_Resize(&out, n * 4) < 0) return NULL;
    return out;
}

PyDoc_STRVAR(u32_array_doc,
"u32_array(text, /) -> bytes\n\n"
"The ids of a JSON array of ints in [0, 2**32) (a bytes-like object holding only the array)\n"
"as native u32 bytes. ValueError for anything not of that plain form.");

static PyObject *u32_array(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t stop;
    PyObject *out = ids_at(view.buf, view.len, 0, 1, &stop);
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(leading_token_ids_doc,
"leading_token_ids(body, /) -> tuple[bytes, int] | None\n\n"
"When the JSON object in body opens with a \"token_ids\" member (the usual layout): its ids\n"
"as `u32_array` gives them, and an offset such that b'{' + body[offset:] is the object\n"
"without that member. None when the first member is another one (or its key has escapes);\n"
"ValueError when token_ids opens the object but is not a plain array, when no '}' or\n"
"', \"' follows the array, or when body does not start as a JSON object.");

static PyObject *leading_token_ids(PyObject *self, PyObject *arg) {
    static const char key[] = "\"token_ids\"";
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const char *text = view.buf, *end = text + view.len;
    const char *p = skip_ws(text, end);
    PyObject *result = NULL;
    if (p == end || *p != '{') {
        PyErr_SetString(PyExc_ValueError, "not a JSON object");
        goto done;
    }
    p = skip_ws(p + 1, end);
    if (end - p < (Py_ssize_t)sizeof key - 1 || memcmp(p, key, sizeof key - 1) != 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    p = skip_ws(p + sizeof key - 1, end);
    if (p == end || *p != ':') {
        PyErr_SetString(PyExc_ValueError, "no ':' after the first key");
        goto done;
    }
    Py_ssize_t stop;
    PyObject *ids = ids_at(text, view.len, p + 1 - text, 0, &stop);
    if (ids == NULL) goto done;
    /* What follows is '}', or ',' and the next member's key: the rest of the object. A comma
     * before '}' is not JSON and must not vanish with the member, so it is refused here. */
    p = skip_ws(text + stop, end);
    int comma = p < end && *p == ',';
    if (comma) p = skip_ws(p + 1, end);
    if (p == end || *p != (comma ? '"' : '}')) {
        Py_DECREF(ids);
        PyErr_SetString(PyExc_ValueError, "token_ids is not followed by '}' or another member");
        goto done;
    }
    result = Py_BuildValue("Nn", ids, (Py_ssize_t)(p - text));
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"u32_array", u32_array, METH_O, u32_array_doc},
    {"leading_token_ids", leading_token_ids, METH_O, leading_token_ids_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_token_json",
    "Token ids from a request's JSON text as native u32 (see kvcache.service.http).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__token_json(void) { return PyModule_Create(&module); }
