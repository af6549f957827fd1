/* blockrep._native: the hot-path helpers of blockrep.
 *
 * Owns: CRC32C (Castagnoli) over any buffer, hardware (SSE4.2 crc32 instruction) when the
 * CPU has it, slicing-by-8 software otherwise; per-block CRC32C; batched positional I/O
 * (preadv/pwritev over a list of (offset, buffer)) that releases the GIL and raises OSError;
 * the peer link's 40-byte packet header built and checked (magic, header CRC32C) in one call.
 * Must not: hold the GIL across a system call or a large checksum, or know about NBD.
 * The pure-Python twin lives in blockrep/native.py; tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define HAVE_X86 1
#endif

#define POLY 0x82F63B78u /* CRC32C, reflected */
#define GIL_THRESHOLD (64 * 1024)

static uint32_t table[8][256];
static int have_hw = 0;

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

/* Software: slicing-by-8. `crc` is the raw (pre-inverted) register. */
static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
              table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
              table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#ifdef HAVE_X86
/* Hardware: three independent crc32q streams hide the instruction's 3-cycle latency; the
 * partial CRCs are merged by multiplying with x^(8*len) mod P (shift_crc below). */
__attribute__((target("sse4.2"))) static uint32_t crc_hw_1(uint32_t crc, const uint8_t *p,
                                                            size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* GF(2) multiply of two reflected 32-bit polynomials modulo P. */
static uint32_t gf2_mul(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        if (a & 0x80000000u)
            prod ^= b;
        a <<= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return prod;
}

/* x^(8*n) mod P in reflected form, computed by square-and-multiply. */
static uint32_t xpow8n(size_t n) {
    uint32_t result = 0x80000000u; /* x^0 */
    uint32_t sq = 0x00800000u;     /* x^8 */
    while (n) {
        if (n & 1)
            result = gf2_mul(result, sq);
        sq = gf2_mul(sq, sq);
        n >>= 1;
    }
    return result;
}

#define STRIPE 8192
static uint32_t stripe_shift; /* x^(8*STRIPE) mod P */

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p,
                                                          size_t n) {
    while (n >= 3 * STRIPE) {
        uint64_t a = crc, b = 0, c = 0;
        const uint8_t *pa = p, *pb = p + STRIPE, *pc = p + 2 * STRIPE;
        for (size_t i = 0; i < STRIPE; i += 8) {
            uint64_t wa, wb, wc;
            memcpy(&wa, pa + i, 8);
            memcpy(&wb, pb + i, 8);
            memcpy(&wc, pc + i, 8);
            a = __builtin_ia32_crc32di(a, wa);
            b = __builtin_ia32_crc32di(b, wb);
            c = __builtin_ia32_crc32di(c, wc);
        }
        /* crc(A||B) = shift(crc(A), |B|) ^ crc0(B) with a zero start register. */
        crc = gf2_mul((uint32_t)a, stripe_shift) ^ (uint32_t)b;
        crc = gf2_mul(crc, stripe_shift) ^ (uint32_t)c;
        p += 3 * STRIPE;
        n -= 3 * STRIPE;
    }
    return crc_hw_1(crc, p, n);
}
#endif

static uint32_t crc_raw(uint32_t crc, const uint8_t *p, size_t n) {
#ifdef HAVE_X86
    if (have_hw)
        return crc_hw(crc, p, n);
#endif
    return crc_sw(crc, p, n);
}

/* crc32c(data, value=0): METH_FASTCALL, no argument tuple parsed per call (the hot path
 * calls it for every packet). `value` is taken modulo 2**32 like the "I" format. */
static PyObject *py_crc32c_impl(PyObject *const *args, Py_ssize_t nargs, int force_sw) {
    Py_buffer buf;
    unsigned long value = 0;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "crc32c expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    if (nargs == 2) {
        value = PyLong_AsUnsignedLongMask(args[1]);
        if (value == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
    }
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t crc = ~(uint32_t)value;
    const uint8_t *p = buf.buf;
    size_t n = (size_t)buf.len;
    if (n >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS crc = force_sw ? crc_sw(crc, p, n) : crc_raw(crc, p, n);
        Py_END_ALLOW_THREADS
    } else {
        crc = force_sw ? crc_sw(crc, p, n) : crc_raw(crc, p, n);
    }
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(~crc);
}

static PyObject *py_crc32c(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return py_crc32c_impl(args, nargs, 0);
}
static PyObject *py_crc32c_sw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return py_crc32c_impl(args, nargs, 1);
}

/* ---- peer link packet header (blockrep.peer.proto) ----------------------------------------
 * magic u32 | type u16 | flags u16 | id u64 | offset u64 | size u32 | paylen u32 | crc u32 |
 * hcrc u32, big-endian; hcrc = CRC32C of the 36 bytes before it. One call per packet instead
 * of a pack, a checksum, a second pack and a concatenation (or an unpack, a view, a checksum
 * and a slice) in Python. */

#define LINK_MAGIC 0x42524550u /* "BREP" */
#define LINK_HEADER 40

static void put_be(uint8_t *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static int field(PyObject *o, int bytes, uint64_t *out) {
    unsigned long long v;
    if (PyLong_Check(o)) {
        v = PyLong_AsUnsignedLongLong(o);
    } else { /* anything with __index__ (a numpy integer), as struct.pack takes it */
        PyObject *i = PyNumber_Index(o);
        if (!i)
            return -1;
        v = PyLong_AsUnsignedLongLong(i);
        Py_DECREF(i);
    }
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (bytes < 8 && v >> (8 * bytes)) {
        PyErr_Format(PyExc_OverflowError, "header field %llu does not fit in %d bytes", v,
                     bytes);
        return -1;
    }
    *out = v;
    return 0;
}

static const int frame_widths[7] = {2, 2, 8, 8, 4, 4, 4}; /* type .. crc, after the magic */

static PyObject *py_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "frame expected 7 arguments, got %zd", nargs);
        return NULL;
    }
    uint8_t h[LINK_HEADER];
    put_be(h, LINK_MAGIC, 4);
    int pos = 4;
    for (int i = 0; i < 7; i++) {
        uint64_t v;
        if (field(args[i], frame_widths[i], &v) < 0)
            return NULL;
        put_be(h + pos, v, frame_widths[i]);
        pos += frame_widths[i];
    }
    put_be(h + 36, ~crc_raw(0xFFFFFFFFu, h, 36), 4);
    return PyBytes_FromStringAndSize((const char *)h, LINK_HEADER);
}

/* parse_header(buf, pos) -> (type, flags, id, offset, size, paylen, crc), or None when the
 * magic or the header checksum is wrong (the caller says which and raises). */
static PyObject *py_parse_header(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "parse_header expected 1 or 2 arguments, got %zd",
                     nargs);
        return NULL;
    }
    Py_ssize_t pos = 0;
    if (nargs == 2) {
        pos = PyLong_AsSsize_t(args[1]);
        if (pos == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || buf.len - pos < LINK_HEADER) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "a packet header needs %d bytes at offset %zd",
                     LINK_HEADER, pos);
        return NULL;
    }
    uint8_t h[LINK_HEADER];
    memcpy(h, (const uint8_t *)buf.buf + pos, LINK_HEADER);
    PyBuffer_Release(&buf);
    if (get_be(h, 4) != LINK_MAGIC || ~crc_raw(0xFFFFFFFFu, h, 36) != get_be(h + 36, 4))
        Py_RETURN_NONE;
    PyObject *t = PyTuple_New(7);
    if (!t)
        return NULL;
    int pos_in = 4;
    for (int i = 0; i < 7; i++) {
        int w = frame_widths[i];
        uint64_t v = get_be(h + pos_in, w);
        PyObject *o = w == 8 ? PyLong_FromUnsignedLongLong(v)
                             : PyLong_FromUnsignedLong((unsigned long)v);
        if (!o) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, o);
        pos_in += w;
    }
    return t;
}

static PyObject *py_crc32c_blocks(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &bs))
        return NULL;
    if (bs <= 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "block size must be positive");
        return NULL;
    }
    Py_ssize_t nblocks = (buf.len + bs - 1) / bs;
    PyObject *out = PyBytes_FromStringAndSize(NULL, nblocks * 4);
    if (!out) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *p = buf.buf;
    Py_ssize_t len = buf.len;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < nblocks; i++) {
        Py_ssize_t off = i * bs;
        Py_ssize_t n = (len - off) < bs ? (len - off) : bs;
        uint32_t c = ~crc_raw(0xFFFFFFFFu, p + off, (size_t)n);
        o[4 * i] = c & 0xff; /* little-endian, whatever the host */
        o[4 * i + 1] = (c >> 8) & 0xff;
        o[4 * i + 2] = (c >> 16) & 0xff;
        o[4 * i + 3] = (c >> 24) & 0xff;
    }
    Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
    return out;
}

/* ---- batched positional I/O ------------------------------------------------------------ */

#define MAX_IOV 1024

typedef struct {
    long long offset;
    Py_buffer buf;
} io_item;

static void release_items(io_item *items, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&items[i].buf);
    PyMem_Free(items);
}

/* Parse [(offset, buffer), ...]; on error returns NULL with an exception set. */
static io_item *parse_items(PyObject *seq_in, Py_ssize_t *count, int writable) {
    PyObject *seq = PySequence_Fast(seq_in, "expected a sequence of (offset, buffer)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    io_item *items = PyMem_Calloc(n ? n : 1, sizeof(io_item));
    if (!items) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Tuple(PySequence_Fast_GET_ITEM(seq, i));
        PyObject *bufobj;
        int ok = it != NULL && PyArg_ParseTuple(it, "LO", &items[i].offset, &bufobj);
        Py_XDECREF(it); /* bufobj stays alive: the list item still references it */
        if (!ok ||
            PyObject_GetBuffer(bufobj, &items[i].buf,
                               writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS
                                        : PyBUF_C_CONTIGUOUS) < 0) {
            release_items(items, i);
            Py_DECREF(seq);
            return NULL;
        }
        if (items[i].offset < 0) {
            release_items(items, i + 1);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "negative offset");
            return NULL;
        }
    }
    Py_DECREF(seq);
    *count = n;
    return items;
}

/* Runs of items with contiguous offsets go out as one preadv/pwritev; short transfers are
 * continued. Reads stop early at end of file (the rest of the buffer is left as is). */
static long long do_batch(int fd, io_item *items, Py_ssize_t n, int write, int *err) {
    long long total = 0;
    struct iovec iov[MAX_IOV];
    Py_ssize_t i = 0;
    while (i < n) {
        int cnt = 0;
        long long off = items[i].offset, run = 0;
        while (i + cnt < n && cnt < MAX_IOV && items[i + cnt].offset == off + run) {
            iov[cnt].iov_base = items[i + cnt].buf.buf;
            iov[cnt].iov_len = (size_t)items[i + cnt].buf.len;
            run += items[i + cnt].buf.len;
            cnt++;
        }
        struct iovec *v = iov;
        int vc = cnt;
        long long pos = off, left = run;
        while (left > 0) {
            ssize_t r = write ? pwritev(fd, v, vc, pos) : preadv(fd, v, vc, pos);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                *err = errno;
                return -1;
            }
            if (r == 0) {
                if (write) {
                    *err = EIO;
                    return -1;
                }
                return total; /* EOF */
            }
            total += r;
            pos += r;
            left -= r;
            while (vc && (size_t)r >= v->iov_len) {
                r -= v->iov_len;
                v++;
                vc--;
            }
            if (vc && r) {
                v->iov_base = (char *)v->iov_base + r;
                v->iov_len -= r;
            }
        }
        i += cnt;
    }
    return total;
}

static PyObject *batch_io(PyObject *args, int write) {
    int fd;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "iO", &fd, &list))
        return NULL;
    Py_ssize_t n;
    io_item *items = parse_items(list, &n, !write);
    if (!items)
        return NULL;
    int err = 0;
    long long total;
    Py_BEGIN_ALLOW_THREADS total = do_batch(fd, items, n, write, &err);
    Py_END_ALLOW_THREADS release_items(items, n);
    if (total < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(total);
}

static PyObject *py_preadv(PyObject *self, PyObject *args) { return batch_io(args, 0); }
static PyObject *py_pwritev(PyObject *self, PyObject *args) { return batch_io(args, 1); }

static PyObject *py_have_hw(PyObject *self, PyObject *noargs) { return PyBool_FromLong(have_hw); }

static PyMethodDef methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_FASTCALL,
     "crc32c(data, value=0) -> int: CRC32C of data, continuing from value."},
    {"crc32c_sw", (PyCFunction)(void (*)(void))py_crc32c_sw, METH_FASTCALL,
     "crc32c using the software table only."},
    {"frame", (PyCFunction)(void (*)(void))py_frame, METH_FASTCALL,
     "frame(type, flags, id, offset, size, paylen, crc) -> the 40-byte link packet header, "
     "its checksum (hcrc) included."},
    {"parse_header", (PyCFunction)(void (*)(void))py_parse_header, METH_FASTCALL,
     "parse_header(buf, pos=0) -> (type, flags, id, offset, size, paylen, crc), or None if "
     "the magic or the header checksum is wrong."},
    {"crc32c_blocks", py_crc32c_blocks, METH_VARARGS,
     "crc32c_blocks(data, block_size) -> bytes: one little-endian uint32 CRC32C per block."},
    {"preadv", py_preadv, METH_VARARGS,
     "preadv(fd, [(offset, buffer), ...]) -> bytes read; releases the GIL."},
    {"pwritev", py_pwritev, METH_VARARGS,
     "pwritev(fd, [(offset, buffer), ...]) -> bytes written; releases the GIL."},
    {"have_hw_crc", py_have_hw, METH_NOARGS, "True if the SSE4.2 crc32 instruction is used."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "blockrep._native",
                                    "blockrep hot-path helpers (CRC32C, batched I/O)", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    init_tables();
#ifdef HAVE_X86
    unsigned int a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2))
        have_hw = 1;
    stripe_shift = xpow8n(STRIPE);
#endif
    return PyModule_Create(&moddef);
}
