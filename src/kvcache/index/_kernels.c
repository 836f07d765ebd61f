/* Compiled kernels of the in-process index's main table (kvcache.index.memory).
 *
 * The table lives in a numpy record array owned by Python (kvcache.index.table.SlotTable):
 * one 16-byte row per slot, {u64 mixed key, u32 set id, u32 clock}, probed linearly inside
 * segments of (seg_mask + 1) slots. These kernels walk a batch of keys one at a time in C,
 * which removes the fixed cost of a vectorised numpy batch (tens of numpy calls) on the ingest
 * path, where batches are small (a message of a vLLM engine carries ~100 block operations).
 *
 * They never allocate table memory and never decide policy: whenever a key needs something
 * only Python does (a reserved-row key, growing or purging the table, evicting for the key
 * budget) a kernel stops and returns its position, Python does it and calls again from there.
 * Entry-set transitions (ids of interned frozensets) come from a Python callable, memoised
 * here per call because a batch is mostly runs of equal ids.
 *
 * Keys arrive as buffers of u64 that Python has already validated.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define EMPTY 0u
#define TOMBSTONE 1u
#define MUL 0x9E3779B97F4A7C15ull
#define XOR 0x6A09E667F3BCC908ull
#define ID_MASK 0x7FFFFFFFu
#define FLAG 0x80000000u

/* Why a kernel stopped before the end of its batch. */
#define DONE 0
#define SPECIAL 1   /* the key mixes to 0 or 1: it lives in a reserved row, Python's job */
#define NEED_ROOM 2 /* inserting would cross max_used: purge or grow first */
#define NEED_EVICT 3 /* inserting would cross the key budget: evict old keys first */
#define FAILED 4     /* the transition callable raised: the exception is returned, not raised,
                        so that Python still learns how far the batch got */

typedef struct {
    uint64_t key;
    uint32_t set;
    uint32_t clock;
} Row;

static inline uint64_t mix(uint64_t k) { return ((k ^ (k >> 32)) * MUL) ^ XOR; }

static inline uint64_t home_of(uint64_t h, uint64_t cap) { return ((h >> 32) * cap) >> 32; }

/* Slot of mixed key h, or -1; with `free_slot`, also the first free slot met (-1 if none). */
static inline int64_t probe(const Row *rows, uint64_t cap, uint64_t segm, uint64_t h,
                            int64_t *free_slot) {
    uint64_t i = home_of(h, cap);
    uint64_t base = i & ~segm;
    int64_t first_free = -1;
    for (uint64_t n = 0; n <= segm; n++) {
        uint64_t k = rows[i].key;
        if (k == h) {
            if (free_slot) *free_slot = first_free;
            return (int64_t)i;
        }
        if (k < 2 && first_free < 0) first_free = (int64_t)i;
        if (k == EMPTY) break;
        i = base | ((i + 1) & segm);
    }
    if (free_slot) *free_slot = first_free;
    return -1;
}

typedef struct {
    Py_buffer view;
    Row *rows;
    uint64_t cap;
    uint64_t segm;
} Table;

static int open_table(Table *t, PyObject *rows, unsigned long long cap,
                      unsigned long long seg_mask) {
    if (PyObject_GetBuffer(rows, &t->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (t->view.itemsize != (Py_ssize_t)sizeof(Row) ||
        t->view.len != (Py_ssize_t)((cap + 3) * sizeof(Row)) || cap == 0 ||
        (seg_mask & (seg_mask + 1)) != 0 || seg_mask >= cap) {
        PyBuffer_Release(&t->view);
        PyErr_SetString(PyExc_ValueError, "rows do not match the table geometry");
        return -1;
    }
    t->rows = (Row *)t->view.buf;
    t->cap = cap;
    t->segm = seg_mask;
    return 0;
}

/* Opens the table's rows and the keys buffer; on failure nothing stays acquired. */
static int open_batch(Table *t, Py_buffer *view, PyObject *rows, unsigned long long cap,
                      unsigned long long seg_mask, PyObject *keys) {
    if (open_table(t, rows, cap, seg_mask) < 0) return -1;
    if (PyObject_GetBuffer(keys, view, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&t->view);
        return -1;
    }
    if (view->itemsize != 8 || view->len % 8 != 0) {
        PyBuffer_Release(view);
        PyBuffer_Release(&t->view);
        PyErr_SetString(PyExc_ValueError, "keys must be a contiguous buffer of u64");
        return -1;
    }
    return 0;
}

/* A memo of entry-set transitions for one kernel call: old id -> (new id, size delta). */
#define MEMO 8
typedef struct {
    PyObject *fn;
    uint32_t old[MEMO];
    uint32_t new_[MEMO];
    long delta[MEMO];
    int n, next;
} Transition;

static int transition(Transition *tr, uint32_t sid, uint32_t *nid, long *delta) {
    for (int j = 0; j < tr->n; j++) {
        if (tr->old[j] == sid) {
            *nid = tr->new_[j];
            *delta = tr->delta[j];
            return 0;
        }
    }
    PyObject *res = PyObject_CallFunction(tr->fn, "k", (unsigned long)sid);
    if (res == NULL) return -1;
    unsigned long n_id;
    long d;
    if (!PyArg_ParseTuple(res, "kl", &n_id, &d)) {
        Py_DECREF(res);
        return -1;
    }
    Py_DECREF(res);
    if (n_id > ID_MASK) {
        PyErr_SetString(PyExc_ValueError, "entry-set id out of range");
        return -1;
    }
    int slot = tr->n < MEMO ? tr->n++ : (tr->next++ % MEMO);
    tr->old[slot] = sid;
    tr->new_[slot] = (uint32_t)n_id;
    tr->delta[slot] = d;
    *nid = (uint32_t)n_id;
    *delta = d;
    return 0;
}

/* The pending exception as a value (status FAILED), else None; clears the error indicator. */
static PyObject *take_error(int status) {
    if (status != FAILED) Py_RETURN_NONE;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  /* PyErr_GetRaisedException needs Python 3.12 */
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value ? value : Py_NewRef(Py_None);
}

PyDoc_STRVAR(add_doc,
"add(rows, cap, seg_mask, keys, start, transition, now, used, max_used, live, max_live)\n"
"-> (stop, status, used, live, pairs_delta, again, error)\n\n"
"Add an entry set to the rows of keys[start:]: insert absent keys, map each row's set id\n"
"through transition(old_id) -> (new_id, size_delta), keep the identity flag, stamp clocks.\n"
"`again` lists the positions whose row held the entries before the call (a repeated key at\n"
"most once). Stops early (status != 0)\n"
"at `stop` when Python must act first; keys before `stop` are applied.");

static PyObject *k_add(PyObject *self, PyObject *args) {
    PyObject *rows_obj, *keys_obj, *fn;
    unsigned long long cap, seg_mask, used, max_used, live, max_live;
    Py_ssize_t start;
    unsigned long now;
    if (!PyArg_ParseTuple(args, "OKKOnOkKKKK", &rows_obj, &cap, &seg_mask, &keys_obj, &start,
                          &fn, &now, &used, &max_used, &live, &max_live))
        return NULL;
    Table t;
    Py_buffer kv;
    if (open_batch(&t, &kv, rows_obj, cap, seg_mask, keys_obj) < 0) return NULL;
    const uint64_t *keys = (const uint64_t *)kv.buf;
    Py_ssize_t n = kv.len / 8;
    Transition tr = {.fn = fn};
    PyObject *again = PyList_New(0);
    long pairs = 0;
    int status = DONE;
    Py_ssize_t pos = start < 0 ? 0 : start;
    if (again == NULL) goto fail;
    for (; pos < n; pos++) {
        uint64_t h = mix(keys[pos]);
        if (h < 2) {
            status = SPECIAL;
            break;
        }
        int64_t free_slot;
        int64_t slot = probe(t.rows, t.cap, t.segm, h, &free_slot);
        uint32_t old = 0;
        int fresh = slot < 0, touched = 0;
        if (fresh) {
            if (free_slot < 0 || live + 1 > max_live) {
                status = free_slot < 0 ? NEED_ROOM : NEED_EVICT;
                break;
            }
            int was_empty = t.rows[free_slot].key == EMPTY;
            if (was_empty && used + 1 > max_used) {
                status = NEED_ROOM;
                break;
            }
            slot = free_slot;
            t.rows[slot].key = h;
            live += 1;
            used += was_empty;
        } else {
            old = t.rows[slot].set;
            /* each add call has its own tick: a row already stamped `now` was added by an
               earlier position of this batch, so a repeated key is reported at most once and
               only for what it held before the call */
            touched = t.rows[slot].clock == (uint32_t)now;
        }
        uint32_t sid = old & ID_MASK, nid;
        long delta;
        if (transition(&tr, sid, &nid, &delta) < 0) {
            if (fresh) {  /* leave no half-written row behind (it stays a used tombstone) */
                t.rows[slot].key = TOMBSTONE;
                live -= 1;
            }
            status = FAILED;
            break;
        }
        t.rows[slot].set = nid | (old & FLAG);
        t.rows[slot].clock = (uint32_t)now;
        pairs += delta;
        if (!fresh && !touched && nid == sid) {
            PyObject *p = PyLong_FromSsize_t(pos);
            if (p == NULL || PyList_Append(again, p) < 0) {
                Py_XDECREF(p);
                goto fail;
            }
            Py_DECREF(p);
        }
    }
    PyBuffer_Release(&kv);
    PyBuffer_Release(&t.view);
    return Py_BuildValue("niKKlNN", pos, status, used, live, pairs, again, take_error(status));
fail:
    Py_XDECREF(again);
    PyBuffer_Release(&kv);
    PyBuffer_Release(&t.view);
    return NULL;
}

PyDoc_STRVAR(remove_doc,
"remove(rows, cap, seg_mask, keys, start, transition) -> (stop, status, live_delta,\n"
"pairs_delta, deleted, error)\n\n"
"Map the set id of each present key of keys[start:] through transition(old_id) ->\n"
"(new_id, size_delta); a row whose set becomes empty and carries no identity flag is\n"
"deleted (tombstoned). Absent keys are skipped. Stops early with status SPECIAL.");

static PyObject *k_remove(PyObject *self, PyObject *args) {
    PyObject *rows_obj, *keys_obj, *fn;
    unsigned long long cap, seg_mask;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "OKKOnO", &rows_obj, &cap, &seg_mask, &keys_obj, &start, &fn))
        return NULL;
    Table t;
    Py_buffer kv;
    if (open_batch(&t, &kv, rows_obj, cap, seg_mask, keys_obj) < 0) return NULL;
    const uint64_t *keys = (const uint64_t *)kv.buf;
    Py_ssize_t n = kv.len / 8;
    Transition tr = {.fn = fn};
    long pairs = 0, live_delta = 0;
    Py_ssize_t deleted = 0;
    int status = DONE;
    Py_ssize_t pos = start < 0 ? 0 : start;
    for (; pos < n; pos++) {
        uint64_t h = mix(keys[pos]);
        if (h < 2) {
            status = SPECIAL;
            break;
        }
        int64_t slot = probe(t.rows, t.cap, t.segm, h, NULL);
        if (slot < 0) continue;
        uint32_t v = t.rows[slot].set, sid = v & ID_MASK, nid;
        long delta;
        if (transition(&tr, sid, &nid, &delta) < 0) {
            status = FAILED;
            break;
        }
        if (nid == sid) continue;
        pairs += delta;
        if (nid == 0 && !(v & FLAG)) {
            t.rows[slot].key = TOMBSTONE;
            live_delta -= 1;
            deleted += 1;
        } else {
            t.rows[slot].set = nid | (v & FLAG);
        }
    }
    PyBuffer_Release(&kv);
    PyBuffer_Release(&t.view);
    return Py_BuildValue("nillnN", pos, status, live_delta, pairs, deleted, take_error(status));
}

PyDoc_STRVAR(prefix_doc,
"prefix(rows, cap, seg_mask, keys, id_mask, now) -> (ids, status)\n\n"
"Set ids (masked with id_mask) of the longest prefix of keys whose rows exist with a non-empty\n"
"set, as bytes of native u32; stamps those rows' clocks with `now` (0: no stamp). Status\n"
"SPECIAL means the key after the returned prefix lives in a reserved row (Python's job).");

static PyObject *k_prefix(PyObject *self, PyObject *args) {
    PyObject *rows_obj, *keys_obj;
    unsigned long long cap, seg_mask;
    unsigned long id_mask, now;
    if (!PyArg_ParseTuple(args, "OKKOkk", &rows_obj, &cap, &seg_mask, &keys_obj, &id_mask, &now))
        return NULL;
    Table t;
    Py_buffer kv;
    if (open_batch(&t, &kv, rows_obj, cap, seg_mask, keys_obj) < 0) return NULL;
    const uint64_t *keys = (const uint64_t *)kv.buf;
    Py_ssize_t n = kv.len / 8;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out == NULL) {
        PyBuffer_Release(&kv);
        PyBuffer_Release(&t.view);
        return NULL;
    }
    uint32_t *ids = (uint32_t *)PyBytes_AS_STRING(out);
    int status = DONE;
    Py_ssize_t pos = 0;
    for (; pos < n; pos++) {
        uint64_t h = mix(keys[pos]);
        if (h < 2) {
            status = SPECIAL;
            break;
        }
        int64_t slot = probe(t.rows, t.cap, t.segm, h, NULL);
        if (slot < 0) break;
        uint32_t id = t.rows[slot].set & (uint32_t)id_mask;
        if (id == 0) break;
        ids[pos] = id;
        if (now) t.rows[slot].clock = (uint32_t)now;
    }
    PyBuffer_Release(&kv);
    PyBuffer_Release(&t.view);
    if (pos < n && _PyBytes_Resize(&out, pos * 4) < 0) return NULL;
    return Py_BuildValue("Ni", out, status);
}

static PyMethodDef methods[] = {
    {"add", k_add, METH_VARARGS, add_doc},
    {"remove", k_remove, METH_VARARGS, remove_doc},
    {"prefix", k_prefix, METH_VARARGS, prefix_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Compiled kernels of the in-process index's main table (see kvcache.index.kernels).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "DONE", DONE) < 0 ||
        PyModule_AddIntConstant(m, "SPECIAL", SPECIAL) < 0 ||
        PyModule_AddIntConstant(m, "NEED_ROOM", NEED_ROOM) < 0 ||
        PyModule_AddIntConstant(m, "NEED_EVICT", NEED_EVICT) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", FAILED) < 0 ||
        PyModule_AddIntConstant(m, "ROW_BYTES", (long)sizeof(Row)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
