/* Compiled fast path of the KV-event decoder (kvcache.events.decode).
 *
 * Where msgspec's time goes on a vLLM batch: the token ids of the BlockStored events (~1,500 per
 * batch, each a freshly allocated Python int) and, for the applier, ~50 single-hash BlockRemoved
 * events. `scan` walks the msgpack payload in C and
 *
 * - folds consecutive BlockRemoved events that name the same medium, group, locality and
 *   ownership into one hash list (a "run");
 * - builds the token_ids list of each BlockStored from a cache of int objects (token ids are
 *   vocabulary indices: a few hundred thousand values, shared by every event), and copies the
 *   event, with an empty token_ids array in their place, into a compact msgpack array that
 *   msgspec decodes in one call (AllBlocksCleared events are copied as they are).
 *
 * It takes ONLY the common layout:
 *
 *   [ts float32/float64, [ {"type": tag, ...}, ... ], rank uint/nil (optional)]
 *
 * and returns None for anything else, or for anything msgspec's direct decode might see
 * differently (a non-u64 hash or token, a duplicate field, an unknown tag, trailing bytes,
 * nesting deeper than MAX_DEPTH...). None is never an error: the Python paths then decode the
 * payload exactly as they would without this module, rejections included. So every accepted
 * payload must be one msgspec's direct path accepts, with the same values; when in doubt, refuse.
 *
 * Every read is checked against the end of the buffer; nothing recurses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 32

/* A read position in the payload. */
typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Cur;

static inline uint64_t left(const Cur *c) { return (uint64_t)(c->end - c->p); }

static inline uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* Reads an n-byte big-endian length/count after the type byte (already consumed). */
static inline int read_be(Cur *c, int n, uint64_t *v) {
    if (left(c) < (uint64_t)n) return -1;
    *v = be(c->p, n);
    c->p += n;
    return 0;
}

/* Total size in bytes of a value by its first byte when that is fixed (ints, floats, nil, bools,
 * fixstr, fixext); 0 for containers, variable-length values and the unused 0xc1. A table, not a
 * switch: token ids alternate between u16 and u32 at random, and a branch per width would be
 * mispredicted on every other one. */
static uint8_t fixed_size[256];

static void init_sizes(void) {
    for (int b = 0x00; b <= 0x7f; b++) fixed_size[b] = 1; /* positive fixint */
    for (int b = 0xe0; b <= 0xff; b++) fixed_size[b] = 1; /* negative fixint */
    for (int b = 0xa0; b <= 0xbf; b++) fixed_size[b] = (uint8_t)(1 + (b & 0x1f)); /* fixstr */
    fixed_size[0xc0] = fixed_size[0xc2] = fixed_size[0xc3] = 1; /* nil, false, true */
    fixed_size[0xcc] = fixed_size[0xd0] = 2;
    fixed_size[0xcd] = fixed_size[0xd1] = 3;
    fixed_size[0xce] = fixed_size[0xd2] = fixed_size[0xca] = 5;
    fixed_size[0xcf] = fixed_size[0xd3] = fixed_size[0xcb] = 9;
    fixed_size[0xd4] = 3; /* fixext: header, type byte, data */
    fixed_size[0xd5] = 4;
    fixed_size[0xd6] = 6;
    fixed_size[0xd7] = 10;
    fixed_size[0xd8] = 18;
}

/* Skips one msgpack value and everything nested in it. Like msgspec skipping an unknown field
 * it checks the structure only (no UTF-8 check of strings, any ext type), but it refuses
 * nesting deeper than MAX_DEPTH, where msgspec may hit the interpreter's recursion limit. A
 * loop with a stack of item counts rather than recursion; every pass consumes at least one
 * byte, and a container may not announce more items than bytes remain. */
static int skip(Cur *c) {
    const uint8_t *p = c->p;
    const uint8_t *end = c->end;
    uint64_t todo[MAX_DEPTH]; /* items still to skip per open level */
    int depth = 0;
    todo[0] = 1;
    for (;;) {
        while (todo[depth] == 0) {
            if (depth == 0) {
                c->p = p;
                return 0;
            }
            depth--;
        }
        /* Runs of fixed-size values (an array of token ids) in a tight loop. */
        uint64_t k = todo[depth];
        while (k && p < end) {
            uint8_t size = fixed_size[*p];
            if (size == 0) break;
            if ((uint64_t)(end - p) < size) return -1;
            p += size;
            k--;
        }
        todo[depth] = k;
        if (k == 0) continue;
        if (p >= end) return -1;
        todo[depth]--;
        uint8_t b = *p++;
        uint64_t n;    /* bytes to step over, or items of a container */
        int items = 0; /* whether n counts container items */
        int width;     /* width of the length/count field */
        if (b >= 0x80 && b <= 0x8f) {
            n = 2u * (b & 0x0f); /* fixmap: two items per entry */
            items = 1;
            width = 0;
        } else if (b >= 0x90 && b <= 0x9f) {
            n = b & 0x0f; /* fixarray */
            items = 1;
            width = 0;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: case 0xc7: width = 1; break; /* bin8, str8, ext8 */
            case 0xc5: case 0xda: case 0xc8: width = 2; break;
            case 0xc6: case 0xdb: case 0xc9: width = 4; break;
            case 0xdc: case 0xde: width = 2; items = 1; break; /* array16, map16 */
            case 0xdd: case 0xdf: width = 4; items = 1; break;
            default: return -1; /* 0xc1: never used */
            }
            if ((uint64_t)(end - p) < (uint64_t)width) return -1;
            n = be(p, width);
            p += width;
            if (b == 0xc7 || b == 0xc8 || b == 0xc9) n += 1; /* ext type byte */
            if (b == 0xde || b == 0xdf) n *= 2;
        }
        if ((uint64_t)(end - p) < n) return -1; /* an item takes at least one byte */
        if (!items) {
            p += n;
        } else if (n > 0) {
            if (depth + 1 >= MAX_DEPTH) return -1;
            todo[++depth] = n;
        }
    }
}

/* A container header: its fix form (first byte fix..fix+15) or the 16- and 32-bit forms
 * (first byte wide and wide + 1); *n is its count of items (arrays) or pairs (maps). */
static int read_container(Cur *c, uint8_t fix, uint8_t wide, uint64_t *n) {
    if (left(c) < 1) return -1;
    uint8_t b = *c->p++;
    if (b >= fix && b <= fix + 0x0f) {
        *n = b & 0x0f;
        return 0;
    }
    if (b == wide) return read_be(c, 2, n);
    if (b == wide + 1) return read_be(c, 4, n);
    return -1;
}

static int read_array(Cur *c, uint64_t *n) { return read_container(c, 0x90, 0xdc, n); }

static int read_map(Cur *c, uint64_t *n) { return read_container(c, 0x80, 0xde, n); }

/* A str (any width); its UTF-8 bytes stay in the payload. */
static int read_str(Cur *c, const uint8_t **s, uint64_t *len) {
    if (left(c) < 1) return -1;
    uint8_t b = *c->p++;
    if (b >= 0xa0 && b <= 0xbf)
        *len = b & 0x1f;
    else if (b == 0xd9) {
        if (read_be(c, 1, len) < 0) return -1;
    } else if (b == 0xda) {
        if (read_be(c, 2, len) < 0) return -1;
    } else if (b == 0xdb) {
        if (read_be(c, 4, len) < 0) return -1;
    } else
        return -1;
    if (left(c) < *len) return -1;
    *s = c->p;
    c->p += *len;
    return 0;
}

/* Non-negative ints in any int encoding (msgspec takes signed encodings of values >= 0), by
 * first byte: total size (0: not an int of this kind), right shift of the big-endian 8-byte load
 * after the type byte, and whether a set top bit (a negative value) refuses it. Tables rather
 * than a switch for the same reason as fixed_size. */
static uint8_t uint_size[256];
static uint8_t uint_shift[256];
static uint8_t uint_signed[256];

static void init_uints(void) {
    static const uint8_t width[4] = {1, 2, 4, 8};
    for (int b = 0x00; b <= 0x7f; b++) uint_size[b] = 1;
    for (int i = 0; i < 4; i++) {
        uint_size[0xcc + i] = uint_size[0xd0 + i] = (uint8_t)(1 + width[i]);
        uint_shift[0xcc + i] = uint_shift[0xd0 + i] = (uint8_t)(64 - 8 * width[i]);
        uint_signed[0xd0 + i] = 1;
    }
}

static inline uint64_t load_be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static int read_uint(Cur *c, uint64_t *v) {
    if (left(c) < 1) return -1;
    const uint8_t *p = c->p;
    uint8_t b = *p;
    uint8_t size = uint_size[b];
    if (size == 0 || left(c) < size) return -1;
    if (size == 1) {
        *v = b;
    } else {
        /* Big-endian two's complement: the top bit of the first byte is the sign. */
        if (uint_signed[b] && (p[1] & 0x80)) return -1;
        if (left(c) >= 9) /* one load and a shift, no branch on the width */
            *v = load_be64(p + 1) >> uint_shift[b];
        else
            *v = be(p + 1, size - 1);
    }
    c->p += size;
    return 0;
}

static int read_float(Cur *c, double *d) {
    if (left(c) < 1) return -1;
    uint8_t b = *c->p;
    if (b == 0xcb && left(c) >= 9) {
        uint64_t bits = be(c->p + 1, 8);
        memcpy(d, &bits, 8);
        c->p += 9;
        return 0;
    }
    if (b == 0xca && left(c) >= 5) {
        uint32_t bits = (uint32_t)be(c->p + 1, 4);
        float f;
        memcpy(&f, &bits, 4);
        *d = (double)f;
        c->p += 5;
        return 0;
    }
    return -1;
}

static inline int is_nil(const Cur *c) { return left(c) >= 1 && *c->p == 0xc0; }

/* Keys this scanner reads; any other key is skipped, as msgspec skips it. */
enum { K_TYPE, K_HASHES, K_MEDIUM, K_GROUP, K_LOCALITY, K_OWNERSHIP, K_TOKENS, K_COUNT };

static int key_id(const uint8_t *s, uint64_t len) {
#define IS(lit) (len == sizeof(lit) - 1 && memcmp(s, lit, sizeof(lit) - 1) == 0)
    if (IS("type")) return K_TYPE;
    if (IS("block_hashes")) return K_HASHES;
    if (IS("medium")) return K_MEDIUM;
    if (IS("group_idx")) return K_GROUP;
    if (IS("locality")) return K_LOCALITY;
    if (IS("ownership")) return K_OWNERSHIP;
    if (IS("token_ids")) return K_TOKENS;
    return -1;
#undef IS
}

/* An optional str field as the payload holds it (s == NULL: nil or absent). */
typedef struct {
    const uint8_t *s;
    uint64_t len;
} OptStr;

/* An optional uint field (present == 0: nil or absent). */
typedef struct {
    int present;
    uint64_t v;
} OptUint;

static int opt_str(const uint8_t *at, const uint8_t *end, OptStr *out) {
    out->s = NULL;
    out->len = 0;
    if (at == NULL) return 0;
    Cur c = {at, end};
    if (is_nil(&c)) return 0;
    return read_str(&c, &out->s, &out->len);
}

static int opt_uint(const uint8_t *at, const uint8_t *end, OptUint *out) {
    out->present = 0;
    out->v = 0;
    if (at == NULL) return 0;
    Cur c = {at, end};
    if (is_nil(&c)) return 0;
    out->present = 1;
    return read_uint(&c, &out->v);
}

static inline int same_str(const OptStr *a, const OptStr *b) {
    if (a->s == NULL || b->s == NULL) return a->s == b->s;
    return a->len == b->len && memcmp(a->s, b->s, a->len) == 0;
}

/* The (medium, group_idx, locality, ownership) a removal run shares. */
typedef struct {
    OptStr medium, locality, ownership;
    OptUint group;
} RunKey;

static int same_run(const RunKey *a, const RunKey *b) {
    return same_str(&a->medium, &b->medium) && same_str(&a->locality, &b->locality) &&
           same_str(&a->ownership, &b->ownership) && a->group.present == b->group.present &&
           a->group.v == b->group.v;
}

/* None, or the str (NULL with UnicodeDecodeError set for bytes that are not UTF-8). */
static PyObject *str_or_none(const OptStr *s) {
    if (s->s == NULL) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8((const char *)s->s, (Py_ssize_t)s->len, "strict");
}

/* Appends the finished run (hashes, medium, group_idx, locality, ownership) to items. */
static int close_run(PyObject *items, PyObject **hashes, const RunKey *key) {
    if (*hashes == NULL) return 0;
    PyObject *medium = str_or_none(&key->medium);
    PyObject *group = key->group.present ? PyLong_FromUnsignedLongLong(key->group.v)
                                         : Py_NewRef(Py_None);
    PyObject *locality = str_or_none(&key->locality);
    PyObject *ownership = str_or_none(&key->ownership);
    PyObject *run = NULL;
    if (medium && group && locality && ownership)
        run = PyTuple_Pack(5, *hashes, medium, group, locality, ownership);
    Py_XDECREF(medium);
    Py_XDECREF(group);
    Py_XDECREF(locality);
    Py_XDECREF(ownership);
    Py_CLEAR(*hashes);
    if (run == NULL) return -1;
    int rc = PyList_Append(items, run);
    Py_DECREF(run);
    return rc;
}

/* Token ids below this share one int object each (at most ~9 MB once every id was seen). */
#define INT_CACHE_SIZE (1u << 18)
static PyObject **int_cache;

/* A new reference to the int v, from the cache when it is small enough. */
static inline PyObject *cached_int(uint64_t v) {
    if (v < INT_CACHE_SIZE) {
        PyObject *o = int_cache[v];
        if (o == NULL) {
            o = PyLong_FromUnsignedLongLong(v);
            if (o == NULL) return NULL;
            int_cache[v] = o; /* the cache keeps this reference for good */
        }
        return Py_NewRef(o);
    }
    return PyLong_FromUnsignedLongLong(v);
}

/* Reads an array of non-negative ints into a new list (cached ints with `cache`), moving `c`
 * past it. Returns the list; NULL without an exception when the array is malformed or holds
 * anything else, NULL with one set when Python failed. */
static PyObject *read_uint_list(Cur *c, int cache) {
    uint64_t n, v;
    if (read_array(c, &n) < 0 || n > left(c)) return NULL; /* an int takes at least one byte */
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL) return NULL;
    for (uint64_t i = 0; i < n; i++) {
        if (read_uint(c, &v) < 0) {
            Py_DECREF(list); /* the unfilled slots are NULL, which the list tolerates */
            return NULL;
        }
        PyObject *o = cache ? cached_int(v) : PyLong_FromUnsignedLongLong(v);
        if (o == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, o);
    }
    return list;
}

/* Checks the array of non-negative ints at `c` without building it, moving `c` past it.
 * Returns a new reference to Ellipsis (the ids were there and are left out), a new empty list
 * when the array is empty (an event that carries no tokens stays one), NULL without an
 * exception when the array is malformed or holds anything else. */
static PyObject *skip_uint_list(Cur *c) {
    uint64_t n;
    if (read_array(c, &n) < 0 || n > left(c)) return NULL;
    if (n == 0) return PyList_New(0);
    /* read_uint without building the value: a table step per id, no branch on its width */
    const uint8_t *p = c->p, *end = c->end;
    for (; n; n--) {
        if (p >= end) return NULL;
        uint8_t b = *p;
        uint8_t size = uint_size[b];
        if (size == 0 || (uint64_t)(end - p) < size) return NULL;
        if (uint_signed[b] && (p[1] & 0x80)) return NULL;
        p += size;
    }
    c->p = p;
    return Py_NewRef(Py_Ellipsis);
}

/* Appends the u64 hashes of the array at `at` to the run's list: 0, -1 (no exception) when
 * the array is malformed or not all u64, -2 with an exception set. */
static int extend_hashes(const uint8_t *at, const uint8_t *end, PyObject **hashes) {
    Cur c = {at, end};
    PyObject *more = read_uint_list(&c, 0);
    if (more == NULL) return PyErr_Occurred() ? -2 : -1;
    if (*hashes == NULL) { /* the run's first event: its list becomes the run's */
        *hashes = more;
        return 0;
    }
    Py_ssize_t at_len = PyList_GET_SIZE(*hashes);
    int rc = PyList_SetSlice(*hashes, at_len, at_len, more);
    Py_DECREF(more);
    return rc < 0 ? -2 : 0;
}

/* One map-form event as read by `read_event`. */
typedef struct {
    const uint8_t *start;          /* its first byte */
    const uint8_t *value[K_COUNT]; /* where each known field's value starts (NULL: absent) */
    const uint8_t *tag;            /* the "type" string */
    uint64_t tlen;
    const uint8_t *tokens_end;     /* just past token_ids, once read */
} Ev;

static inline int is_tag(const Ev *ev, const char *name, uint64_t len) {
    return ev->tlen == len && memcmp(ev->tag, name, len) == 0;
}
#define IS_STORED(ev) is_tag((ev), "BlockStored", 11)
#define IS_REMOVED(ev) is_tag((ev), "BlockRemoved", 12)
#define IS_CLEARED(ev) is_tag((ev), "AllBlocksCleared", 16)

/* Reads the token ids at `at` into *tokens: built (skip 0) or checked (skip 1, see
 * skip_uint_list). Returns 0, -1 (refuse) or -2 (exception set). */
static int tokens_at(const uint8_t *at, const uint8_t *end, int skip, PyObject **tokens,
                     const uint8_t **after) {
    Cur c = {at, end};
    *tokens = skip ? skip_uint_list(&c) : read_uint_list(&c, 1);
    if (*tokens == NULL) return PyErr_Occurred() ? -2 : -1;
    *after = c.p;
    return 0;
}

/* Reads the event map at c, moving c past it. When "type" says BlockStored before
 * "token_ids" comes (as vLLM sends it), the token ids are read in the same pass into *tokens.
 * Returns 0, -1 (refuse: not the common layout) or -2 (exception set). */
static int read_event(Cur *c, Ev *ev, int skip_tokens, PyObject **tokens) {
    uint64_t pairs;
    memset(ev, 0, sizeof *ev);
    ev->start = c->p;
    if (read_map(c, &pairs) < 0 || pairs > left(c) / 2) return -1;
    for (uint64_t i = 0; i < pairs; i++) {
        const uint8_t *k;
        uint64_t klen;
        if (read_str(c, &k, &klen) < 0) return -1; /* msgspec wants str keys */
        int id = key_id(k, klen);
        if (id >= 0) {
            /* msgspec keeps the last of duplicate fields, or rejects a second "type": rare
               enough to leave to it. */
            if (ev->value[id] != NULL) return -1;
            ev->value[id] = c->p;
        }
        if (id == K_TYPE) {
            if (read_str(c, &ev->tag, &ev->tlen) < 0) return -1;
        } else if (id == K_TOKENS && ev->tag != NULL && IS_STORED(ev)) {
            int rc = tokens_at(c->p, c->end, skip_tokens, tokens, &ev->tokens_end);
            if (rc < 0) return rc;
            c->p = ev->tokens_end;
        } else if (skip(c) < 0) {
            return -1;
        }
    }
    return ev->tag == NULL ? -1 : 0;
}

/* The token ids of a BlockStored read by `read_event` (or now, when "type" came after
 * "token_ids"). Returns 0, -1 (refuse: token_ids is required) or -2 (exception set). */
static int stored_tokens(Ev *ev, const uint8_t *end, int skip, PyObject **tokens) {
    if (ev->value[K_TOKENS] == NULL) return -1;
    if (*tokens != NULL) return 0;
    return tokens_at(ev->value[K_TOKENS], end, skip, tokens, &ev->tokens_end);
}

static inline void put(uint8_t **out, const uint8_t *from, const uint8_t *to) {
    memcpy(*out, from, (size_t)(to - from));
    *out += to - from;
}

/* The payload's bytes: 1, or 0 when it is no contiguous buffer (the Python paths report it),
 * -1 with an exception set. */
static int get_payload(PyObject *arg, Py_buffer *view) {
    if (PyObject_GetBuffer(arg, view, PyBUF_SIMPLE) == 0) return 1;
    if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* The batch's head: a 2- or 3-array (the third item is the dp rank, see finish_batch), its
 * timestamp, and the event array's header (``count`` events, each at least a byte). */
static int read_batch_head(Cur *c, uint64_t *top, double *ts, uint64_t *count) {
    if (read_array(c, top) < 0 || *top < 2 || *top > 3) return -1;
    if (read_float(c, ts) < 0) return -1;
    if (read_array(c, count) < 0 || *count > left(c)) return -1;
    return 0;
}

/* After the events: the optional rank (into *rank, None when absent or nil), no trailing
 * bytes (msgspec refuses those), and the `copied` events at `out` made a msgpack array (or
 * *others None when there are none). Returns 0, -1 (refuse) or -2 (exception set). */
static int finish_batch(Cur *c, uint64_t top, PyObject **rank, PyObject **others,
                        const uint8_t *out, uint64_t copied) {
    uint64_t r;
    if (top == 3) {
        if (is_nil(c)) {
            c->p++;
        } else if (read_uint(c, &r) == 0) {
            *rank = PyLong_FromUnsignedLongLong(r);
            if (*rank == NULL) return -2;
        } else {
            return -1;
        }
    }
    if (c->p != c->end) return -1;
    if (*rank == NULL) *rank = Py_NewRef(Py_None);
    if (!copied) {
        Py_SETREF(*others, Py_NewRef(Py_None));
        return 0;
    }
    uint8_t *head = (uint8_t *)PyBytes_AS_STRING(*others);
    head[0] = 0xdd; /* array32 */
    for (int i = 0; i < 4; i++) head[1 + i] = (uint8_t)(copied >> (24 - 8 * i));
    return _PyBytes_Resize(others, (Py_ssize_t)(out - head)) < 0 ? -2 : 0;
}

/* On an error: None when it is a str field that is not UTF-8 (the payload's fault, which
 * msgspec rejects too; the Python paths report it), else NULL with the error kept. */
static PyObject *none_if_bad_utf8(void) {
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
    PyErr_Clear();
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(scan_doc,
"scan(payload, skip_tokens=False, /) -> (ts, dp_rank, items, merged, others) | None\n\n"
"Decode a batch of map-form events. items has one entry per decoded event, in order:\n"
"- a (block_hashes, medium, group_idx, locality, ownership) tuple per run of consecutive\n"
"  BlockRemoved events with equal medium, group_idx, locality and ownership (hashes\n"
"  concatenated; merged counts the events folded into an earlier one);\n"
"- the token_ids list of a BlockStored, which is the next event of `others` (with\n"
"  skip_tokens, Ellipsis instead of a non-empty list: the ids were checked, not built);\n"
"- None for an AllBlocksCleared, the next event of `others`.\n"
"others is a msgpack array of the BlockStored (with empty token_ids) and AllBlocksCleared\n"
"events, or None when there are none. None when the payload is not in the common layout.");

static PyObject *f_scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg;
    int skip_tokens = 0;
    if (!PyArg_ParseTuple(args, "O|p", &arg, &skip_tokens)) return NULL;
    if (int_cache == NULL) {
        int_cache = PyMem_Calloc(INT_CACHE_SIZE, sizeof(PyObject *));
        if (int_cache == NULL) return PyErr_NoMemory();
    }
    Py_buffer view;
    int got = get_payload(arg, &view);
    if (got <= 0) return got < 0 ? NULL : Py_NewRef(Py_None);
    const uint8_t *base = (const uint8_t *)view.buf;
    const uint8_t *end = base + view.len;
    Cur c = {base, end};
    PyObject *items = NULL, *hashes = NULL, *tokens = NULL, *others = NULL, *result = NULL;
    PyObject *rank = NULL;
    RunKey run = {{NULL, 0}, {NULL, 0}, {NULL, 0}, {0, 0}};
    Py_ssize_t merged = 0;
    uint64_t top, count, copied = 0;
    uint8_t *out = NULL;
    double ts;
    int rc;

    if (read_batch_head(&c, &top, &ts, &count) < 0) goto refuse;
    items = PyList_New(0);
    /* The copies never outgrow the payload: an array32 header, then events at most as long
       as the originals (token_ids only shrink). */
    others = PyBytes_FromStringAndSize(NULL, view.len + 5);
    if (items == NULL || others == NULL) goto error;
    out = (uint8_t *)PyBytes_AS_STRING(others) + 5;

    for (uint64_t e = 0; e < count; e++) {
        Ev ev;
        rc = read_event(&c, &ev, skip_tokens, &tokens);
        if (rc == -1) goto refuse;
        if (rc < 0) goto error;
        const uint8_t *start = ev.start;
        const uint8_t *const *value = ev.value;

        if (IS_REMOVED(&ev)) {
            RunKey key;
            if (value[K_HASHES] == NULL || opt_str(value[K_MEDIUM], end, &key.medium) < 0 ||
                opt_uint(value[K_GROUP], end, &key.group) < 0 ||
                opt_str(value[K_LOCALITY], end, &key.locality) < 0 ||
                opt_str(value[K_OWNERSHIP], end, &key.ownership) < 0)
                goto refuse;
            if (hashes != NULL && same_run(&run, &key)) {
                merged++;
            } else {
                if (close_run(items, &hashes, &run) < 0) goto error;
                run = key;
            }
            rc = extend_hashes(value[K_HASHES], end, &hashes);
            if (rc == -1) goto refuse;
            if (rc < 0) goto error;
            continue;
        }
        if (close_run(items, &hashes, &run) < 0) goto error;
        if (IS_STORED(&ev)) {
            rc = stored_tokens(&ev, end, skip_tokens, &tokens);
            if (rc == -1) goto refuse;
            if (rc < 0) goto error;
            /* The event with "token_ids": [] for msgspec; the list goes in items. */
            put(&out, start, value[K_TOKENS]);
            *out++ = 0x90;
            put(&out, ev.tokens_end, c.p);
            rc = PyList_Append(items, tokens);
            Py_CLEAR(tokens);
            if (rc < 0) goto error;
        } else if (IS_CLEARED(&ev)) {
            put(&out, start, c.p);
            if (PyList_Append(items, Py_None) < 0) goto error;
        } else {
            goto refuse; /* unknown tag: the Python paths reject that one event */
        }
        copied++;
    }
    if (close_run(items, &hashes, &run) < 0) goto error;

    rc = finish_batch(&c, top, &rank, &others, out, copied);
    if (rc == -1) goto refuse;
    if (rc < 0) goto error;
    result = Py_BuildValue("dOOnO", ts, rank, items, merged, others);
    goto done;

error:
    result = none_if_bad_utf8();
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(rank);
    Py_XDECREF(tokens);
    Py_XDECREF(hashes);
    Py_XDECREF(items);
    Py_XDECREF(others);
    PyBuffer_Release(&view);
    return result;
}

/* ------------------------------------------------------------------------------------------
 * scan_runs: the same layout for a pod in identity mode, whose block hashes are index keys as
 * they are. The applier then needs no event objects at all, only, in order, the runs of keys to
 * add and to remove per (medium, group) and the clears: they come as native u64 bytes, which
 * the index takes without building a Python int per key.
 * ---------------------------------------------------------------------------------------- */

enum { OP_STORE = 0, OP_REMOVE = 1, OP_CLEAR = 2 };

/* The keys of the run being built (a growable u64 array). */
typedef struct {
    uint64_t *v;
    size_t n, cap;
} Keys;

/* Appends the u64 array at `at` to keys. Returns 0, -1 (refuse: malformed or not all u64) or
 * -2 (exception set); *after is just past the array. */
static int read_keys(const uint8_t *at, const uint8_t *end, Keys *k, const uint8_t **after) {
    Cur c = {at, end};
    uint64_t n;
    if (read_array(&c, &n) < 0 || n > left(&c)) return -1;
    if (k->n + n > k->cap) {
        size_t cap = k->cap ? k->cap : 256;
        while (cap < k->n + n) cap *= 2;
        uint64_t *grown = PyMem_Realloc(k->v, cap * sizeof(uint64_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -2;
        }
        k->v = grown;
        k->cap = cap;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (read_uint(&c, &k->v[k->n + i]) < 0) return -1;
    }
    k->n += n;
    *after = c.p;
    return 0;
}

/* Whether some key occurs twice (an engine can store one block twice in a batch: the applier
 * then counts copies). An open-addressing set; keys are hashes, so their top bits spread. */
static int has_repeat(const uint64_t *v, size_t n, int *repeat) {
    uint64_t local[1024];
    int bits = 1;
    while (((size_t)1 << bits) < 2 * n) bits++;
    size_t size = (size_t)1 << bits, mask = size - 1;
    uint64_t *table = size <= 1024 ? local : PyMem_Malloc(size * sizeof(uint64_t));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(table, 0, size * sizeof(uint64_t)); /* 0 marks a free slot; key 0 is tracked apart */
    int zero = 0;
    *repeat = 0;
    for (size_t i = 0; i < n && !*repeat; i++) {
        uint64_t key = v[i];
        if (key == 0) {
            *repeat = zero;
            zero = 1;
            continue;
        }
        size_t at = (size_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits)) & mask;
        while (table[at] != 0 && table[at] != key) at = (at + 1) & mask;
        *repeat = table[at] == key;
        table[at] = key;
    }
    if (table != local) PyMem_Free(table);
    return 0;
}

/* Appends (kind, medium, group_idx, keys as native u64 bytes, repeats) for the run being built
 * (if any) to ops and empties it. */
static int close_op(PyObject *ops, int *kind, const RunKey *key, Keys *keys) {
    if (*kind < 0) return 0;
    int repeat = 0;
    if (*kind == OP_STORE && keys->n > 1 && has_repeat(keys->v, keys->n, &repeat) < 0) return -1;
    PyObject *medium = str_or_none(&key->medium);
    PyObject *group = key->group.present ? PyLong_FromUnsignedLongLong(key->group.v)
                                         : Py_NewRef(Py_None);
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)keys->v,
                                                (Py_ssize_t)(keys->n * sizeof(uint64_t)));
    PyObject *op = NULL;
    if (medium && group && bytes)
        op = Py_BuildValue("iOOOO", *kind, medium, group, bytes, repeat ? Py_True : Py_False);
    Py_XDECREF(medium);
    Py_XDECREF(group);
    Py_XDECREF(bytes);
    keys->n = 0;
    *kind = -1;
    if (op == NULL) return -1;
    int rc = PyList_Append(ops, op);
    Py_DECREF(op);
    return rc;
}

/* Copies the event at [from, to) to out with the arrays at a and b (in either order, each
 * [start, end)) replaced by empty ones. */
static void put_without(uint8_t **out, const uint8_t *from, const uint8_t *to,
                        const uint8_t *a, const uint8_t *a_end, const uint8_t *b,
                        const uint8_t *b_end) {
    if (b < a) {
        const uint8_t *t = a, *t_end = a_end;
        a = b, a_end = b_end, b = t, b_end = t_end;
    }
    put(out, from, a);
    *(*out)++ = 0x90;
    put(out, a_end, b);
    *(*out)++ = 0x90;
    put(out, b_end, to);
}

PyDoc_STRVAR(scan_runs_doc,
"scan_runs(payload, /) -> (ts, dp_rank, ops, stored_events, removed_events, others) | None\n\n"
"Decode a batch of map-form events of a pod in identity mode. ops, in order: one\n"
"(kind, medium, group_idx, keys, repeats) per run of consecutive BlockStored (kind 0) or\n"
"BlockRemoved (kind 1) events naming the same medium and group_idx (and, for removals,\n"
"locality and ownership), keys their block hashes as native-endian u64 bytes, repeats\n"
"whether a stored key occurs twice in the run; (2, None, None, None, False) per\n"
"AllBlocksCleared. BlockStored events with no hashes add nothing (they still count). Token\n"
"ids are checked, never built. others is a msgpack array of the BlockStored (with empty\n"
"block_hashes and token_ids) and AllBlocksCleared events for msgspec to validate, or None.\n"
"None when the payload is not in the common layout, or holds a BlockStored without token\n"
"ids (an offload tier's store: the applier treats those apart).");

static PyObject *f_scan_runs(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    int got = get_payload(arg, &view);
    if (got <= 0) return got < 0 ? NULL : Py_NewRef(Py_None);
    const uint8_t *base = (const uint8_t *)view.buf;
    const uint8_t *end = base + view.len;
    Cur c = {base, end};
    PyObject *ops = NULL, *tokens = NULL, *others = NULL, *result = NULL, *rank = NULL;
    Keys keys = {NULL, 0, 0};
    RunKey run = {{NULL, 0}, {NULL, 0}, {NULL, 0}, {0, 0}};
    int kind = -1;
    Py_ssize_t stored = 0, removed = 0;
    uint64_t top, count, copied = 0;
    uint8_t *out = NULL;
    double ts;
    int rc;

    if (read_batch_head(&c, &top, &ts, &count) < 0) goto refuse;
    ops = PyList_New(0);
    others = PyBytes_FromStringAndSize(NULL, view.len + 5); /* copies only shrink */
    if (ops == NULL || others == NULL) goto error;
    out = (uint8_t *)PyBytes_AS_STRING(others) + 5;

    for (uint64_t e = 0; e < count; e++) {
        Ev ev;
        rc = read_event(&c, &ev, 1, &tokens);
        if (rc == -1) goto refuse;
        if (rc < 0) goto error;
        const uint8_t *const *value = ev.value;
        RunKey key = {{NULL, 0}, {NULL, 0}, {NULL, 0}, {0, 0}};
        int this_kind;
        if (IS_REMOVED(&ev)) {
            this_kind = OP_REMOVE;
            removed++;
            if (opt_str(value[K_LOCALITY], end, &key.locality) < 0 ||
                opt_str(value[K_OWNERSHIP], end, &key.ownership) < 0)
                goto refuse;
        } else if (IS_STORED(&ev)) {
            this_kind = OP_STORE;
            stored++;
            rc = stored_tokens(&ev, end, 1, &tokens);
            if (rc == -1) goto refuse;
            if (rc < 0) goto error;
            int without = tokens != Py_Ellipsis; /* an empty list: no token ids */
            Py_CLEAR(tokens);
            if (without) goto refuse;
        } else if (IS_CLEARED(&ev)) {
            if (close_op(ops, &kind, &run, &keys) < 0) goto error;
            PyObject *op = Py_BuildValue("iOOOO", OP_CLEAR, Py_None, Py_None, Py_None, Py_False);
            if (op == NULL) goto error;
            rc = PyList_Append(ops, op);
            Py_DECREF(op);
            if (rc < 0) goto error;
            put(&out, ev.start, c.p);
            copied++;
            continue;
        } else {
            goto refuse; /* unknown tag: the Python paths reject that one event */
        }
        if (value[K_HASHES] == NULL || opt_str(value[K_MEDIUM], end, &key.medium) < 0 ||
            opt_uint(value[K_GROUP], end, &key.group) < 0)
            goto refuse;
        Cur h = {value[K_HASHES], end};
        uint64_t n;
        if (read_array(&h, &n) < 0) goto refuse;
        const uint8_t *hashes_end = h.p; /* right for an empty array */
        if (n > 0) { /* an event without hashes changes nothing: it neither opens nor ends a run */
            if (kind != this_kind || !same_run(&run, &key)) {
                if (close_op(ops, &kind, &run, &keys) < 0) goto error;
                kind = this_kind;
                run = key;
            }
            rc = read_keys(value[K_HASHES], end, &keys, &hashes_end);
            if (rc == -1) goto refuse;
            if (rc < 0) goto error;
        }
        if (this_kind == OP_STORE) {
            /* msgspec still checks every other field, as it would decode the event */
            put_without(&out, ev.start, c.p, value[K_HASHES], hashes_end, value[K_TOKENS],
                        ev.tokens_end);
            copied++;
        }
    }
    if (close_op(ops, &kind, &run, &keys) < 0) goto error;

    rc = finish_batch(&c, top, &rank, &others, out, copied);
    if (rc == -1) goto refuse;
    if (rc < 0) goto error;
    result = Py_BuildValue("dOOnnO", ts, rank, ops, stored, removed, others);
    goto done;

error:
    result = none_if_bad_utf8();
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(keys.v);
    Py_XDECREF(rank);
    Py_XDECREF(tokens);
    Py_XDECREF(ops);
    Py_XDECREF(others);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", f_scan, METH_VARARGS, scan_doc},
    {"scan_runs", f_scan_runs, METH_O, scan_runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_fastdecode",
    .m_doc = "Compiled fast path of the KV-event decoder (see kvcache.events.decode).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastdecode(void) {
    init_sizes();
    init_uints();
    return PyModule_Create(&module);
}
