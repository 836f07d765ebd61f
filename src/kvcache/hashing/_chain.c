/* Compiled vLLM block-key chains for the common case: plain token ids, no extra keys.
 *
 * kvcache.hashing.vllm builds each block's preimage by hand (canonical CBOR or pickle protocol
 * 5 of ``(parent, tuple(tokens), None)``) and hashes it with SHA-256; in Python that costs about
 * 1 us per block, mostly interpreter work around hashlib. This module lays out the same bytes
 * in one reused buffer and runs its own SHA-256 over them: a portable implementation of
 * FIPS 180-4 and, where the CPU has the SHA extensions, one built on them (chosen at import,
 * switchable for tests). Python keeps every other case (extra keys, xxhash, huge pickle blocks)
 * and validates anything this module refuses, so that bad tokens get Python's error messages.
 *
 * Preimages (bs = block size, toks = the block's token ids, P = the 32-byte parent digest):
 *   CBOR      83 58 20 P | array head(bs) | uint(tok)... | F6
 *   PICKLE    80 05 95 u64le(frame body length) | 43 20 P | 94 [28 if bs > 3] | int(tok)...
 *             | (74 if bs > 3 else TUPLE1-3) 94 | 4E | 87 94 2E
 *   CBOR_INT  83 uint(parent as u64) | array head(bs) | uint(tok)... | F6   (0.10.0-0.10.1)
 * The published key is the digest's last 8 bytes read big-endian.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SHA_NI 1
#include <immintrin.h>
#endif

#define MODE_CBOR 0
#define MODE_PICKLE 1
#define MODE_CBOR_INT 2

/* ------------------------------------------------------------------------------------------ */
/* SHA-256 (FIPS 180-4)                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* First 32 bits of the fractional parts of the cube roots of the first 64 primes (4.2.2). */
static const uint32_t K256[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u,
    0xab1c5ed5u, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
    0x9bdc06a7u, 0xc19bf174u, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu,
    0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
    0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu,
    0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u, 0xa2bfe8a1u, 0xa81a664bu,
    0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u, 0x19a4c116u,
    0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u,
    0xc67178f2u,
};

/* First 32 bits of the fractional parts of the square roots of the first 8 primes (5.3.3). */
static const uint32_t H256[8] = {
    0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
    0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u,
};

typedef void (*compress_fn)(uint32_t state[8], const uint8_t *data, size_t blocks);

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline uint32_t load_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static inline void store_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* 6.2.2: the message schedule and the 64 rounds, one 64-byte block at a time. */
static void compress_portable(uint32_t state[8], const uint8_t *data, size_t blocks) {
    uint32_t w[64];
    for (; blocks; blocks--, data += 64) {
        for (int t = 0; t < 16; t++) w[t] = load_be32(data + 4 * t);
        for (int t = 16; t < 64; t++) {
            uint32_t x = w[t - 15], y = w[t - 2];
            uint32_t s0 = rotr(x, 7) ^ rotr(x, 18) ^ (x >> 3);
            uint32_t s1 = rotr(y, 17) ^ rotr(y, 19) ^ (y >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
        uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
        for (int t = 0; t < 64; t++) {
            uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          K256[t] + w[t];
            uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        state[0] += a;
        state[1] += b;
        state[2] += c;
        state[3] += d;
        state[4] += e;
        state[5] += f;
        state[6] += g;
        state[7] += h;
    }
}

#ifdef HAVE_SHA_NI
/* The same compression on the SHA extensions. SHA256RNDS2 does two rounds on the state split
 * into (A,B,E,F) and (C,D,G,H) registers (A in the top lane), taking W[t]+K[t] for both rounds
 * in the low two lanes of its third operand; after two rounds the old (A,B,E,F) is the new
 * (C,D,G,H), so the two registers swap roles every two rounds. SHA256MSG1/MSG2 compute four
 * schedule words at a time: MSG1 adds sigma0 of the following word to W[t-16..t-13], the
 * caller adds W[t-7..t-4], and MSG2 adds sigma1 of W[t-2] (the last two of them produced by
 * MSG2 itself). */
__attribute__((target("sha,sse4.1"))) static void compress_sha_ni(uint32_t state[8],
                                                                  const uint8_t *data,
                                                                  size_t blocks) {
    /* Byte order within each 32-bit lane: the message is big-endian. */
    const __m128i swap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
    __m128i lo = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)state), 0x1B);      /* DCBA */
    __m128i hi = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(state + 4)), 0x1B); /* HGFE */
    __m128i abef = _mm_unpackhi_epi64(hi, lo); /* lanes from low: F E B A */
    __m128i cdgh = _mm_unpacklo_epi64(hi, lo); /* lanes from low: H G D C */
    for (; blocks; blocks--, data += 64) {
        __m128i abef0 = abef, cdgh0 = cdgh;
        __m128i m[4];
        for (int i = 0; i < 4; i++)
            m[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * i)), swap);
        for (int g = 0; g < 16; g++) {
            /* m[g & 3] holds W[4g..4g+3]; before the update it held W[4g-16..4g-13]. */
            if (g >= 4) {
                __m128i x = _mm_sha256msg1_epu32(m[g & 3], m[(g + 1) & 3]);
                x = _mm_add_epi32(x, _mm_alignr_epi8(m[(g + 3) & 3], m[(g + 2) & 3], 4));
                m[g & 3] = _mm_sha256msg2_epu32(x, m[(g + 3) & 3]);
            }
            __m128i wk = _mm_add_epi32(m[g & 3], _mm_loadu_si128((const __m128i *)(K256 + 4 * g)));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk); /* now the new A,B,E,F */
            abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0E));
        }
        abef = _mm_add_epi32(abef, abef0);
        cdgh = _mm_add_epi32(cdgh, cdgh0);
    }
    _mm_storeu_si128((__m128i *)state, _mm_shuffle_epi32(_mm_unpackhi_epi64(cdgh, abef), 0x1B));
    _mm_storeu_si128((__m128i *)(state + 4),
                     _mm_shuffle_epi32(_mm_unpacklo_epi64(cdgh, abef), 0x1B));
}

static int cpu_has_sha_ni(void) {
    return __builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1");
}
#else
static int cpu_has_sha_ni(void) { return 0; }
#endif

static compress_fn compress = compress_portable;

/* Padding space sha256_padded needs after a message: 0x80, zeros, the 8-byte length. */
#define PAD_ROOM 72

/* SHA-256 of buf[0..len), padding in place: buf must have PAD_ROOM writable bytes after len.
 * Leaves the final state (the digest as big-endian words) in state. */
static void sha256_padded(uint8_t *buf, size_t len, uint32_t state[8]) {
    size_t total = (len + 9 + 63) & ~(size_t)63;
    buf[len] = 0x80;
    memset(buf + len + 1, 0, total - len - 9);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) buf[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    memcpy(state, H256, sizeof H256);
    compress(state, buf, total / 64);
}

/* ------------------------------------------------------------------------------------------ */
/* Token ids                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Token ids as native u32: borrowed from a u32 buffer, or converted into owned memory. Any
 * form or value this refuses raises TypeError/ValueError; Python then validates (and names the
 * offending token) or converts. */
typedef struct {
    const uint32_t *ids;
    Py_ssize_t n;
    uint32_t *owned;
    Py_buffer view;
    int has_view;
} Tokens;

static void release_tokens(Tokens *t) {
    if (t->has_view) PyBuffer_Release(&t->view);
    PyMem_Free(t->owned);
    t->has_view = 0;
    t->owned = NULL;
}

static int refuse(PyObject *kind, const char *message) {
    PyErr_SetString(kind, message);
    return -1;
}

/* The integer type code of a native-order format ("I", "=q", "<H" on little-endian ...). */
static char native_int_code(const char *format) {
    if (format == NULL) return 'B';
    if (format[0] == '@' || format[0] == '=') format++;
#if PY_LITTLE_ENDIAN
    else if (format[0] == '<') format++;
#else
    else if (format[0] == '>' || format[0] == '!') format++;
#endif
    if (format[0] == '\0' || format[1] != '\0' || strchr("bBhHiIlLqQ", format[0]) == NULL)
        return 0;
    return format[0];
}

static int open_buffer_tokens(Tokens *t, PyObject *obj) {
    if (PyObject_GetBuffer(obj, &t->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    t->has_view = 1;
    char code = native_int_code(t->view.format);
    Py_ssize_t size = t->view.itemsize;
    if (code == 0 || t->view.ndim != 1 || (size != 1 && size != 2 && size != 4 && size != 8))
        return refuse(PyExc_TypeError, "tokens must be a 1-D buffer of native integers");
    Py_ssize_t n = t->view.len / size;
    t->n = n;
    if (size == 4 && (code == 'I' || code == 'L')) {
        t->ids = (const uint32_t *)t->view.buf;
        return 0;
    }
    int is_signed = strchr("bhilq", code) != NULL;
    t->owned = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (t->owned == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    const char *raw = t->view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v;
        uint64_t u;
        switch (size) {
        case 1: v = is_signed ? ((const int8_t *)raw)[i] : ((const uint8_t *)raw)[i]; break;
        case 2: v = is_signed ? ((const int16_t *)raw)[i] : ((const uint16_t *)raw)[i]; break;
        case 4: v = is_signed ? (int64_t)((const int32_t *)raw)[i] : (int64_t)((const uint32_t *)raw)[i]; break;
        default:
            u = ((const uint64_t *)raw)[i];
            if (is_signed ? (int64_t)u < 0 || u > UINT32_MAX : u > UINT32_MAX)
                return refuse(PyExc_ValueError, "token id outside [0, 2**32)");
            v = (int64_t)u;
        }
        if (v < 0) return refuse(PyExc_ValueError, "token id outside [0, 2**32)");
        t->owned[i] = (uint32_t)v;
    }
    t->ids = t->owned;
    return 0;
}

/* A list or tuple of exact ints (bool included, as array('I') takes it). Other element types
 * may run Python code on conversion (__index__), which could mutate a list under us: refused,
 * Python converts those. */
static int open_sequence_tokens(Tokens *t, PyObject *seq) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    t->n = n;
    t->owned = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (t->owned == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_Check(item)) return refuse(PyExc_TypeError, "token ids must be ints");
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow || v < 0 || v > (long long)UINT32_MAX) {
            PyErr_Clear();
            return refuse(PyExc_ValueError, "token id outside [0, 2**32)");
        }
        t->owned[i] = (uint32_t)v;
    }
    t->ids = t->owned;
    return 0;
}

static int open_tokens(Tokens *t, PyObject *obj) {
    memset(t, 0, sizeof *t);
    int rc;
    if (PyList_Check(obj) || PyTuple_Check(obj))
        rc = open_sequence_tokens(t, obj);
    else if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj))
        rc = open_buffer_tokens(t, obj); /* raw bytes are never token ids */
    else
        rc = refuse(PyExc_TypeError, "tokens must be a list, tuple or integer buffer");
    if (rc < 0) release_tokens(t);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Preimages                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static inline uint8_t *cbor_head(uint8_t *p, uint8_t major, uint64_t v) {
    uint8_t mt = (uint8_t)(major << 5);
    if (v < 24) {
        *p++ = mt | (uint8_t)v;
    } else if (v < 0x100) {
        *p++ = mt | 24;
        *p++ = (uint8_t)v;
    } else if (v < 0x10000) {
        *p++ = mt | 25;
        *p++ = (uint8_t)(v >> 8);
        *p++ = (uint8_t)v;
    } else if (v < 0x100000000ull) {
        *p++ = mt | 26;
        store_be32(p, (uint32_t)v);
        p += 4;
    } else {
        *p++ = mt | 27;
        for (int i = 7; i >= 0; i--) *p++ = (uint8_t)(v >> (8 * i));
    }
    return p;
}

/* The C pickler's int opcodes: BININT1, BININT2, BININT, LONG1 (5 bytes for [2**31, 2**32)). */
static inline uint8_t *pickle_uint(uint8_t *p, uint32_t v) {
    if (v < 0x100) {
        *p++ = 'K';
        *p++ = (uint8_t)v;
    } else if (v < 0x10000) {
        *p++ = 'M';
        *p++ = (uint8_t)v;
        *p++ = (uint8_t)(v >> 8);
    } else {
        int long1 = v >= 0x80000000u;
        *p++ = long1 ? 0x8a : 'J';
        if (long1) *p++ = 5;
        for (int i = 0; i < 4; i++) *p++ = (uint8_t)(v >> (8 * i));
        if (long1) *p++ = 0; /* the sign byte that keeps the value positive */
    }
    return p;
}

/* Where a chain call writes and what it returns. */
typedef struct {
    int mode;
    Py_ssize_t block_size;
    uint8_t parent[32];   /* digest modes */
    uint64_t parent_int;  /* MODE_CBOR_INT */
    uint64_t *keys;       /* out: one key per block, or NULL */
    PyObject *digests;    /* out: a list of 32-byte bytes, or NULL */
} Chain;

/* From this many blocks on, `keys` releases the GIL while it hashes (below, the hand-off costs
 * more than it frees: ~113 ns a block with the SHA extensions). */
#define NOGIL_BLOCKS 32

/* Bytes before the parent / between the parent and the first token, at most. */
#define HEAD_MAX 16
#define LEAD_MAX 16
#define TRAIL_MAX 8

/* Chains ``blocks`` blocks of ``ids``; 0, or -1 with a Python error set. Without digests (keys
 * only) it touches no Python object: `keys` runs it with the GIL released, so 0 or -2 for
 * "out of memory" (the caller raises once it holds the GIL again). */
static int run_chain(Chain *c, const uint32_t *ids, Py_ssize_t blocks) {
    Py_ssize_t bs = c->block_size;
    size_t room = HEAD_MAX + 32 + LEAD_MAX + 7 * (size_t)bs + TRAIL_MAX + PAD_ROOM;
    uint8_t *buf = PyMem_RawMalloc(room); /* the raw allocator needs no GIL */
    if (buf == NULL) {
        if (c->digests == NULL) return -2;
        PyErr_NoMemory();
        return -1;
    }
    uint8_t lead[LEAD_MAX], trail[TRAIL_MAX];
    size_t lead_len, trail_len, parent_at = 0;
    if (c->mode == MODE_PICKLE) {
        memcpy(buf, "\x80\x05\x95", 3); /* PROTO 5, FRAME; the frame length follows */
        buf[11] = 'C';                   /* SHORT_BINBYTES of 32 bytes: the parent */
        buf[12] = 32;
        parent_at = 13;
        lead[0] = 0x94; /* MEMOIZE, then MARK when the tuple has more than 3 items */
        lead[1] = '(';
        lead_len = bs > 3 ? 2 : 1;
        static const uint8_t tuple_ops[4] = {')', 0x85, 0x86, 0x87};
        trail[0] = bs > 3 ? 't' : tuple_ops[bs];
        memcpy(trail + 1, "\x94N\x87\x94.", 5); /* MEMOIZE, None, TUPLE3, MEMOIZE, STOP */
        trail_len = 6;
    } else {
        lead_len = (size_t)(cbor_head(lead, 4, (uint64_t)bs) - lead); /* array of bs items */
        trail[0] = 0xF6;                                               /* extra keys: null */
        trail_len = 1;
        if (c->mode == MODE_CBOR) {
            memcpy(buf, "\x83\x58\x20", 3); /* 3-array, bytes of 32: the parent */
            parent_at = 3;
        }
    }
    if (c->mode != MODE_CBOR_INT) memcpy(buf + parent_at, c->parent, 32);
    for (Py_ssize_t b = 0; b < blocks; b++) {
        uint8_t *p;
        if (c->mode == MODE_CBOR_INT) {
            buf[0] = 0x83;
            p = cbor_head(buf + 1, 0, c->parent_int);
        } else {
            p = buf + parent_at + 32;
        }
        memcpy(p, lead, lead_len);
        p += lead_len;
        const uint32_t *tok = ids + b * bs;
        if (c->mode == MODE_PICKLE)
            for (Py_ssize_t j = 0; j < bs; j++) p = pickle_uint(p, tok[j]);
        else
            for (Py_ssize_t j = 0; j < bs; j++) p = cbor_head(p, 0, tok[j]);
        memcpy(p, trail, trail_len);
        p += trail_len;
        size_t len = (size_t)(p - buf);
        if (c->mode == MODE_PICKLE) {
            uint64_t body = len - 11; /* everything after the FRAME length */
            for (int i = 0; i < 8; i++) buf[3 + i] = (uint8_t)(body >> (8 * i));
        }
        uint32_t state[8];
        sha256_padded(buf, len, state);
        uint64_t key = (uint64_t)state[6] << 32 | state[7];
        if (c->keys) c->keys[b] = key;
        if (c->mode == MODE_CBOR_INT) {
            c->parent_int = key;
            continue;
        }
        for (int i = 0; i < 8; i++) store_be32(buf + parent_at + 4 * i, state[i]);
        if (c->digests) {
            PyObject *d = PyBytes_FromStringAndSize((const char *)buf + parent_at, 32);
            if (d == NULL) {
                PyMem_RawFree(buf);
                return -1;
            }
            PyList_SET_ITEM(c->digests, b, d);
        }
    }
    PyMem_RawFree(buf);
    return 0;
}

/* Parses (tokens, block_size, mode, parent) into c and t; on failure nothing stays held. */
static int open_chain(PyObject *args, Chain *c, Tokens *t, Py_ssize_t *blocks) {
    PyObject *tokens, *parent;
    memset(c, 0, sizeof *c);
    if (!PyArg_ParseTuple(args, "OniO", &tokens, &c->block_size, &c->mode, &parent)) return -1;
    if (c->block_size < 1 || c->block_size > (1 << 20))
        return refuse(PyExc_ValueError, "block_size must be in [1, 2**20]");
    if (c->mode == MODE_CBOR_INT) {
        c->parent_int = PyLong_AsUnsignedLongLong(parent);
        if (c->parent_int == (uint64_t)-1 && PyErr_Occurred()) return -1;
    } else if (c->mode == MODE_CBOR || c->mode == MODE_PICKLE) {
        if (!PyBytes_Check(parent) || PyBytes_GET_SIZE(parent) != 32)
            return refuse(PyExc_ValueError, "parent must be 32 digest bytes");
        memcpy(c->parent, PyBytes_AS_STRING(parent), 32);
    } else {
        return refuse(PyExc_ValueError, "unknown mode");
    }
    if (open_tokens(t, tokens) < 0) return -1;
    *blocks = t->n / c->block_size;
    return 0;
}

PyDoc_STRVAR(keys_doc,
"keys(tokens, block_size, mode, parent, /) -> bytes\n\n"
"The u64 key of each full block (native byte order), chained from parent (32 digest bytes;\n"
"a u64 int for MODE_CBOR_INT). tokens: a list or tuple of ints or a 1-D native integer\n"
"buffer; TypeError for other forms, ValueError for an id outside [0, 2**32).");

static PyObject *c_keys(PyObject *self, PyObject *args) {
    Chain c;
    Tokens t;
    Py_ssize_t blocks;
    if (open_chain(args, &c, &t, &blocks) < 0) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, blocks * 8);
    if (out != NULL) {
        c.keys = (uint64_t *)PyBytes_AS_STRING(out);
        int rc;
        if (blocks >= NOGIL_BLOCKS) {
            /* Other threads (gRPC workers, a library caller's pool) run meanwhile: hashing is
             * most of a score, and it needs nothing of Python. A token buffer written by
             * another thread meanwhile gives wrong keys, never a crash (its export pins it). */
            Py_BEGIN_ALLOW_THREADS
            rc = run_chain(&c, t.ids, blocks);
            Py_END_ALLOW_THREADS
        } else {
            rc = run_chain(&c, t.ids, blocks);
        }
        if (rc == -2) PyErr_NoMemory();
        if (rc < 0) Py_CLEAR(out);
    }
    release_tokens(&t);
    return out;
}

PyDoc_STRVAR(digests_doc,
"digests(tokens, block_size, mode, parent, /) -> list[bytes]\n\n"
"The 32-byte digest of each full block (MODE_CBOR and MODE_PICKLE), as `keys` chains them.");

static PyObject *c_digests(PyObject *self, PyObject *args) {
    Chain c;
    Tokens t;
    Py_ssize_t blocks;
    if (open_chain(args, &c, &t, &blocks) < 0) return NULL;
    if (c.mode == MODE_CBOR_INT) {
        release_tokens(&t);
        return PyErr_Format(PyExc_ValueError, "MODE_CBOR_INT chains ints, not digests");
    }
    c.digests = PyList_New(blocks);
    if (c.digests != NULL && run_chain(&c, t.ids, blocks) < 0) Py_CLEAR(c.digests);
    release_tokens(&t);
    return c.digests;
}

PyDoc_STRVAR(sha256_doc, "sha256(data, /) -> bytes\n\nThe SHA-256 digest of a bytes-like object.");

static PyObject *c_sha256(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint8_t *buf = PyMem_Malloc((size_t)view.len + PAD_ROOM);
    if (buf == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    memcpy(buf, view.buf, (size_t)view.len);
    uint32_t state[8];
    sha256_padded(buf, (size_t)view.len, state);
    PyBuffer_Release(&view);
    for (int i = 0; i < 8; i++) store_be32(buf + 4 * i, state[i]);
    PyObject *out = PyBytes_FromStringAndSize((const char *)buf, 32);
    PyMem_Free(buf);
    return out;
}

PyDoc_STRVAR(use_sha_ni_doc,
"use_sha_ni(enabled, /) -> bool\n\n"
"Use the SHA-extension compression when enabled and the CPU has it, else the portable one\n"
"(tests force each); returns whether the SHA extensions are now in use.");

static PyObject *c_use_sha_ni(PyObject *self, PyObject *arg) {
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0) return NULL;
#ifdef HAVE_SHA_NI
    compress = enabled && cpu_has_sha_ni() ? compress_sha_ni : compress_portable;
    return PyBool_FromLong(compress == compress_sha_ni);
#else
    compress = compress_portable;
    return PyBool_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"keys", c_keys, METH_VARARGS, keys_doc},
    {"digests", c_digests, METH_VARARGS, digests_doc},
    {"sha256", c_sha256, METH_O, sha256_doc},
    {"use_sha_ni", c_use_sha_ni, METH_O, use_sha_ni_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chain",
    "Compiled vLLM block-key chains (see kvcache.hashing.vllm).", -1, methods,
};

PyMODINIT_FUNC PyInit__chain(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    int sha_ni = cpu_has_sha_ni();
#ifdef HAVE_SHA_NI
    if (sha_ni) compress = compress_sha_ni;
#endif
    if (PyModule_AddIntConstant(m, "MODE_CBOR", MODE_CBOR) < 0 ||
        PyModule_AddIntConstant(m, "MODE_PICKLE", MODE_PICKLE) < 0 ||
        PyModule_AddIntConstant(m, "MODE_CBOR_INT", MODE_CBOR_INT) < 0 ||
        PyModule_AddObjectRef(m, "SHA_NI_SUPPORTED", sha_ni ? Py_True : Py_False) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
