/* Fused float32 kernels for klayer's training step (optional; NumPy is the reference).
 *
 * Each kernel does in one pass over memory what the NumPy code in layers.py,
 * losses.py, data.py, bnstats.py and optim.py does in several calls; the formulas are
 * those, and the tests check every kernel against them. klayer/kernels.py is the
 * only caller: it checks dtypes, shapes and contiguity, and falls back to NumPy when
 * this module is absent. Arrays arrive through the buffer protocol (rows are
 * examples, C order); each kernel re-checks the byte lengths it is given, so a wrong
 * call raises instead of touching memory it does not own.
 *
 * Build flags keep float32 arithmetic as NumPy's (no FMA contraction), so
 * gather_standardize, add_scaled, sgd_l2_step, the bias added in bn_relu_forward and
 * its running-average update are bit-identical to their NumPy twins; the reductions
 * (batch-norm statistics, softmax) accumulate in double, except the bias gradient,
 * which adds in float32 row by row as NumPy's sum over rows does.
 * tests/test_kernels.py and tests/test_kernels_fused.py hold them to that.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_gemm.h"

/* The loops are compiled twice on x86-64 Linux, for AVX2 and for the baseline, and the
 * loader picks one for the CPU. Besides wider vectors, VEX-encoded code avoids the
 * stall that legacy SSE code pays right after OpenBLAS's AVX kernels. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL
#endif

/* r = a * b for sizes: 0 with ValueError when either is negative or the product
 * overflows, so a length check can never pass by wrap-around. */
static int
size_mul(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *r)
{
    if (a < 0 || b < 0) {
        PyErr_SetString(PyExc_ValueError, "sizes must not be negative");
        return 0;
    }
    if (a != 0 && b > PY_SSIZE_T_MAX / a) {
        PyErr_SetString(PyExc_ValueError, "sizes too large");
        return 0;
    }
    *r = a * b;
    return 1;
}

/* The byte count of a (x b x c) float32 (or, with item 8, int64) array, checked. */
static int
bytes_of(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c, Py_ssize_t item, Py_ssize_t *r)
{
    Py_ssize_t t;
    return size_mul(a, b, &t) && size_mul(t, c, &t) && size_mul(t, item, r);
}

/* A private copy of an int64 buffer, so that values checked here cannot change after
 * the GIL is released (another thread may own the array). NULL with an error set. */
static int64_t *
copy_int64(const Py_buffer *b, Py_ssize_t *n, const char *what)
{
    if (b->len % (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of int64s",
                     what, b->len);
        return NULL;
    }
    *n = b->len / (Py_ssize_t)sizeof(int64_t);
    int64_t *c = malloc(b->len > 0 ? (size_t)b->len : 1);
    if (!c)
        return (int64_t *)PyErr_NoMemory();
    memcpy(c, b->buf, (size_t)b->len);
    return c;
}

static int
check_len(const Py_buffer *b, Py_ssize_t want, const char *what);

/* Two float32 buffers of one length (y, x of y += a x): 0 with ValueError otherwise. */
static int
same_floats(const Py_buffer *y, const Py_buffer *x)
{
    if (y->len % 4) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of float32s", y->len);
        return 0;
    }
    return check_len(x, y->len, "the second array");
}

static int
check_len(const Py_buffer *b, Py_ssize_t want, const char *what)
{
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", what, want, b->len);
        return 0;
    }
    return 1;
}

#define AHEAD 2  /* rows prefetched ahead of the one being converted */

static void
prefetch_row(const uint8_t *row, Py_ssize_t d)
{
#if defined(__GNUC__)
    for (Py_ssize_t j = 0; j < d; j += 64) __builtin_prefetch(row + j);
#else
    (void)row; (void)d;
#endif
}

KERNEL static void
gather_standardize_impl(const uint8_t *restrict x, const int64_t *restrict ix, Py_ssize_t n, Py_ssize_t d,
                        const float *restrict sh, const float *restrict sc, float *restrict o)
{
    /* First one read of each row's first and last byte (its pages, a CIFAR row being
     * under a page long): these independent loads walk the page tables of all the rows
     * at once, where the conversion below would miss the TLB row after row (random rows
     * of a memory-mapped file on 4 KB pages). volatile: the loads must happen. */
    volatile uint8_t touched = 0;
    for (Py_ssize_t i = 0; d > 0 && i < n; i++) {
        const uint8_t *row = x + ix[i] * d;
        touched ^= row[0];
        touched ^= row[d - 1];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *row = x + ix[i] * d;
        float *orow = o + i * d;
        if (i + AHEAD < n)  /* random rows: ask for a later one while converting this one */
            prefetch_row(x + ix[i + AHEAD] * d, d);
        for (Py_ssize_t j = 0; j < d; j++)
            orow[j] = ((float)row[j] - sh[j]) * sc[j];
    }
}

/* out[i, j] = ((float)X[idx[i], j] - shift[j]) * scale[j]
 * X (N, d) uint8, idx (n,) int64, shift and scale (d,), out (n, d): gather and
 * standardize a mini-batch in one pass (data.Data.standardize of X[idx]). */
static PyObject *
gather_standardize(PyObject *self, PyObject *args)
{
    Py_buffer X, idx, shift, scale, out;
    Py_ssize_t N, d;
    if (!PyArg_ParseTuple(args, "y*nny*y*y*w*", &X, &N, &d, &idx, &shift, &scale, &out))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n, xlen, dlen, olen;
    int64_t *ix = copy_int64(&idx, &n, "idx");
    if (!ix || !bytes_of(N, d, 1, 1, &xlen) || !bytes_of(d, 1, 1, 4, &dlen) ||
        !bytes_of(n, d, 1, 4, &olen))
        goto done;
    if (!check_len(&X, xlen, "X") || !check_len(&shift, dlen, "shift") ||
        !check_len(&scale, dlen, "scale") || !check_len(&out, olen, "out"))
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ix[i] < 0 || ix[i] >= N) {
            PyErr_Format(PyExc_IndexError, "row %lld is out of range for %zd rows",
                         (long long)ix[i], N);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    gather_standardize_impl(X.buf, ix, n, d, shift.buf, scale.buf, out.buf);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    free(ix);
    PyBuffer_Release(&X); PyBuffer_Release(&idx); PyBuffer_Release(&shift);
    PyBuffer_Release(&scale); PyBuffer_Release(&out);
    return ret;
}

/* Image i of x (n images of c x h x w floats, channel-major), mirrored left-right when
 * mirror[i], then moved dy[i] rows down and dx[i] columns right into o, the pixels
 * uncovered zero: augment.random_flip then augment.random_translate, one pass (a copy,
 * so the same bits). */
KERNEL static void
move_images_impl(const float *restrict x, float *restrict o, const uint8_t *restrict mirror,
                 const int64_t *restrict dy, const int64_t *restrict dx, Py_ssize_t n,
                 Py_ssize_t c, Py_ssize_t h, Py_ssize_t w)
{
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t ch = 0; ch < c; ch++)
            for (Py_ssize_t y = 0; y < h; y++) {
                float *orow = o + ((i * c + ch) * h + y) * w;
                Py_ssize_t sy = y - dy[i];
                if (sy < 0 || sy >= h) {
                    memset(orow, 0, (size_t)w * sizeof(float));
                    continue;
                }
                const float *srow = x + ((i * c + ch) * h + sy) * w;
                for (Py_ssize_t xo = 0; xo < w; xo++) {
                    Py_ssize_t sx = xo - dx[i];
                    orow[xo] = sx < 0 || sx >= w ? 0.0f : srow[mirror[i] ? w - 1 - sx : sx];
                }
            }
}

/* Whether two buffers share a byte. */
static int
overlap(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a0 < b0 + b->len && b0 < a0 + a->len;
}

/* move_images(x, o, mirror, dy, dx, c, h, w): x and o n images of c h w float32s,
 * mirror n bytes, dy and dx n int64s each (any values: a move past the frame leaves
 * zeros). */
static PyObject *
move_images(PyObject *self, PyObject *args)
{
    Py_buffer x, o, mirror, dy, dx;
    Py_ssize_t c, h, w;
    if (!PyArg_ParseTuple(args, "y*w*y*y*y*nnn", &x, &o, &mirror, &dy, &dx, &c, &h, &w))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = mirror.len, ny, nx, want;
    int64_t *ys = copy_int64(&dy, &ny, "dy"), *xs = copy_int64(&dx, &nx, "dx");
    if (!ys || !xs || !bytes_of(n, c, h, 1, &want) || !bytes_of(want, w, 1, 4, &want))
        goto done;
    if (ny != n || nx != n) {
        PyErr_Format(PyExc_ValueError, "%zd mirror flags, %zd dy and %zd dx", n, ny, nx);
        goto done;
    }
    if (!check_len(&x, want, "x") || !check_len(&o, want, "out"))
        goto done;
    if (overlap(&o, &x)) {
        PyErr_SetString(PyExc_ValueError, "the output overlaps the input");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* past the frame is past it: no overflow below */
        ys[i] = ys[i] < -h ? -h : ys[i] > h ? h : ys[i];
        xs[i] = xs[i] < -w ? -w : xs[i] > w ? w : xs[i];
    }
    Py_BEGIN_ALLOW_THREADS
    move_images_impl(x.buf, o.buf, mirror.buf, ys, xs, n, c, h, w);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    free(ys); free(xs);
    PyBuffer_Release(&x); PyBuffer_Release(&o); PyBuffer_Release(&mirror);
    PyBuffer_Release(&dy); PyBuffer_Release(&dx);
    return ret;
}

/* Training-mode batch norm then ReLU (layers.batchnorm_forward_train, relu_forward).
 * s (n, m) -> x_hat = (s - mu) inv_std, y = max(gamma x_hat + beta, 0), with the batch
 * mean mu and biased variance var (m,) accumulated in double; inv_std = 1/sqrt(var+eps).
 * With a bias b (m,), s += b first, in place (the linear map's "+ b", as NumPy's). */
KERNEL static void
bn_relu_forward_impl(float *restrict s, const float *restrict b, Py_ssize_t n, Py_ssize_t m,
                     const float *restrict gamma, const float *restrict beta, double eps,
                     double *restrict acc, float *restrict x_hat, float *restrict y,
                     float *restrict mu, float *restrict var, float *restrict inv_std)
{
    if (b)
        for (Py_ssize_t i = 0; i < n; i++)
            for (Py_ssize_t j = 0; j < m; j++) s[i * m + j] += b[j];
    for (Py_ssize_t j = 0; j < m; j++) acc[j] = 0.0;
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) acc[j] += s[i * m + j];
    for (Py_ssize_t j = 0; j < m; j++) { mu[j] = (float)(acc[j] / n); acc[j] = 0.0; }
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) {
            double c = (double)s[i * m + j] - mu[j];
            acc[j] += c * c;
        }
    for (Py_ssize_t j = 0; j < m; j++) {
        double v = acc[j] / n;
        var[j] = (float)v;
        inv_std[j] = (float)(1.0 / sqrt(v + eps));
    }
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) {
            float xh = (s[i * m + j] - mu[j]) * inv_std[j];
            float z = xh * gamma[j] + beta[j];
            x_hat[i * m + j] = xh;
            y[i * m + j] = z < 0.0f ? 0.0f : z;  /* NaN passes, as np.maximum's */
        }
}

/* The running averages of the batch statistics (bnstats.update_running), each float32
 * operation rounded as NumPy's: with copy, mu_av = mu and var_av = var (the assignment's
 * first batch); else mu_av = keep mu_av + take mu and var_av = keep var_av + take
 * (vscale var) (vscale = n / (n - 1) for torch's unbiased variance, else 1).  All (m,). */
static void
running_update(float *restrict mu_av, float *restrict var_av, const float *restrict mu,
               const float *restrict var, Py_ssize_t m, int copy, float keep, float take,
               float vscale)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        if (copy) {
            mu_av[j] = mu[j];
            var_av[j] = var[j];
            continue;
        }
        float a = mu_av[j] * keep, c = take * mu[j];
        mu_av[j] = a + c;
        a = var_av[j] * keep;
        c = take * (var[j] * vscale);
        var_av[j] = a + c;
    }
}

/* The optional arguments of bn_relu_forward: a bias b (m,) and the running statistics,
 * running = (mu_av, var_av, copy, keep, take, vscale), each None when not wanted. */
typedef struct {
    Py_buffer b, mu_av, var_av;
    int has_b, has_running, copy;
    double keep, take, vscale;
} BNExtras;

static int
bn_extras_get(BNExtras *e, PyObject *b, PyObject *running, Py_ssize_t m4)
{
    if (b != Py_None) {
        if (PyObject_GetBuffer(b, &e->b, PyBUF_C_CONTIGUOUS) < 0)
            return 0;
        e->has_b = 1;
        if (!check_len(&e->b, m4, "b"))
            return 0;
    }
    if (running != Py_None) {
        if (!PyTuple_Check(running)) {
            PyErr_SetString(PyExc_TypeError, "running must be a tuple or None");
            return 0;
        }
        if (!PyArg_ParseTuple(running, "w*w*pddd", &e->mu_av, &e->var_av, &e->copy, &e->keep,
                              &e->take, &e->vscale))
            return 0;
        e->has_running = 1;
        if (!check_len(&e->mu_av, m4, "mu_av") || !check_len(&e->var_av, m4, "var_av"))
            return 0;
    }
    return 1;
}

static void
bn_extras_release(BNExtras *e)
{
    if (e->has_b)
        PyBuffer_Release(&e->b);
    if (e->has_running) {
        PyBuffer_Release(&e->mu_av);
        PyBuffer_Release(&e->var_av);
    }
}

static PyObject *
bn_relu_forward(PyObject *self, PyObject *args)
{
    Py_buffer s = {0}, gamma, beta, x_hat, y, mu, var, inv_std;
    Py_ssize_t T, n, m;
    double eps;
    PyObject *s_obj, *b_obj, *running_obj;
    BNExtras e;
    if (!PyArg_ParseTuple(args, "Onnny*y*dw*w*w*w*w*OO", &s_obj, &T, &n, &m, &gamma, &beta,
                          &eps, &x_hat, &y, &mu, &var, &inv_std, &b_obj, &running_obj))
        return NULL;
    PyObject *ret = NULL;
    double *acc = NULL;
    Py_ssize_t nm, m4;
    int have_s = 0;
    memset(&e, 0, sizeof(e));
    if (!bytes_of(T, n, m, 4, &nm) || !bytes_of(T, m, 1, 4, &m4) ||
        !bn_extras_get(&e, b_obj, running_obj, m4))
        goto done;
    /* s is written (s += b) only when a bias is given */
    if (PyObject_GetBuffer(s_obj, &s, PyBUF_C_CONTIGUOUS | (e.has_b ? PyBUF_WRITABLE : 0)) < 0)
        goto done;
    have_s = 1;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "batch norm needs at least one row");
        goto done;
    }
    if (!check_len(&s, nm, "s") || !check_len(&gamma, m4, "gamma") ||
        !check_len(&beta, m4, "beta") || !check_len(&x_hat, nm, "x_hat") ||
        !check_len(&y, nm, "y") || !check_len(&mu, m4, "mu") || !check_len(&var, m4, "var") ||
        !check_len(&inv_std, m4, "inv_std"))
        goto done;
    if (!(acc = malloc(sizeof(double) * (size_t)(m > 0 ? m : 1)))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) {  /* T stacked networks' layers, one after another */
        Py_ssize_t a = t * n * m, c = t * m;
        bn_relu_forward_impl((float *)s.buf + a, e.has_b ? (const float *)e.b.buf + c : NULL,
                             n, m, (const float *)gamma.buf + c, (const float *)beta.buf + c,
                             eps, acc, (float *)x_hat.buf + a, (float *)y.buf + a,
                             (float *)mu.buf + c, (float *)var.buf + c,
                             (float *)inv_std.buf + c);
        if (e.has_running)
            running_update((float *)e.mu_av.buf + c, (float *)e.var_av.buf + c,
                           (const float *)mu.buf + c, (const float *)var.buf + c, m, e.copy,
                           (float)e.keep, (float)e.take, (float)e.vscale);
    }
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    free(acc);
    bn_extras_release(&e);
    if (have_s)
        PyBuffer_Release(&s);
    PyBuffer_Release(&gamma); PyBuffer_Release(&beta);
    PyBuffer_Release(&x_hat); PyBuffer_Release(&y); PyBuffer_Release(&mu);
    PyBuffer_Release(&var); PyBuffer_Release(&inv_std);
    return ret;
}

/* Backward of bn_relu_forward (relu_backward then layers.batchnorm_backward):
 * dy = dh * 1[y > 0], dbeta = sum_i dy_i, dgamma = sum_i dy_i x_hat_i (double sums),
 * ds = (n dy - dbeta - x_hat dgamma) * (gamma inv_std / n).   All (n, m) or (m,).
 * With db (m,), also db = sum_i ds_i (the bias gradient of the linear map before),
 * added in float32 row after row: NumPy's ds.sum(axis=0) for m >= 2, bit for bit (for
 * m == 1 NumPy sums pairwise; kernels.py leaves that case to it). acc holds 2 m doubles. */
KERNEL static void
bn_relu_backward_impl(const float *restrict dh, const float *restrict y, const float *restrict x_hat,
                      const float *restrict inv_std, const float *restrict gamma, Py_ssize_t n, Py_ssize_t m,
                      double *restrict acc, float *restrict ds, float *restrict dgamma, float *restrict dbeta,
                      float *restrict db)
{
    double *ab = acc, *ag = acc + m;
    for (Py_ssize_t j = 0; j < m; j++) ab[j] = ag[j] = 0.0;
    /* dy = dh * 1[y > 0]: a product, as relu_backward's, so NaN passes as in NumPy */
    for (Py_ssize_t i = 0; i < n * m; i++) ds[i] = dh[i] * (y[i] > 0.0f ? 1.0f : 0.0f);
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) {
            ab[j] += ds[i * m + j];
            ag[j] += (double)ds[i * m + j] * x_hat[i * m + j];
        }
    const float fn = (float)n;
    for (Py_ssize_t j = 0; j < m; j++) {
        dbeta[j] = (float)ab[j];
        dgamma[j] = (float)ag[j];
        acc[j] = gamma[j] * inv_std[j] / fn;  /* ab is no longer needed */
    }
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) {
            float t = ds[i * m + j] * fn - dbeta[j] - x_hat[i * m + j] * dgamma[j];
            ds[i * m + j] = t * (float)acc[j];
        }
    if (!db)
        return;
    for (Py_ssize_t j = 0; j < m; j++) db[j] = 0.0f;  /* from 0, as NumPy (-0 sums to +0) */
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t j = 0; j < m; j++) db[j] += ds[i * m + j];
}

static PyObject *
bn_relu_backward(PyObject *self, PyObject *args)
{
    Py_buffer dh, y, x_hat, inv_std, gamma, ds, dgamma, dbeta, db = {0};
    Py_ssize_t T, n, m;
    PyObject *db_obj;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*nnnw*w*w*O", &dh, &y, &x_hat, &inv_std, &gamma, &T,
                          &n, &m, &ds, &dgamma, &dbeta, &db_obj))
        return NULL;
    PyObject *ret = NULL;
    double *acc = NULL;
    Py_ssize_t nm, m4;
    int has_db = 0;
    if (!bytes_of(T, n, m, 4, &nm) || !bytes_of(T, m, 1, 4, &m4))
        goto done;
    if (db_obj != Py_None) {  /* an optional output: the bias gradient (m,) */
        if (PyObject_GetBuffer(db_obj, &db, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        has_db = 1;
        if (!check_len(&db, m4, "db"))
            goto done;
    }
    if (!check_len(&dh, nm, "dh") || !check_len(&y, nm, "y") ||
        !check_len(&x_hat, nm, "x_hat") || !check_len(&inv_std, m4, "inv_std") ||
        !check_len(&gamma, m4, "gamma") || !check_len(&ds, nm, "ds") ||
        !check_len(&dgamma, m4, "dgamma") || !check_len(&dbeta, m4, "dbeta"))
        goto done;
    if (!(acc = malloc(sizeof(double) * (size_t)(m > 0 ? 2 * m : 1)))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < T; t++) {
        Py_ssize_t a = t * n * m, b = t * m;
        bn_relu_backward_impl((const float *)dh.buf + a, (const float *)y.buf + a,
                              (const float *)x_hat.buf + a, (const float *)inv_std.buf + b,
                              (const float *)gamma.buf + b, n, m, acc, (float *)ds.buf + a,
                              (float *)dgamma.buf + b, (float *)dbeta.buf + b,
                              has_db ? (float *)db.buf + b : NULL);
    }
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    free(acc);
    if (has_db)
        PyBuffer_Release(&db);
    PyBuffer_Release(&dh); PyBuffer_Release(&y); PyBuffer_Release(&x_hat);
    PyBuffer_Release(&inv_std); PyBuffer_Release(&gamma); PyBuffer_Release(&ds);
    PyBuffer_Release(&dgamma); PyBuffer_Release(&dbeta);
    return ret;
}

/* Mean softmax cross-entropy of scores (n, K) against labels y (n,) int64, and its
 * gradient dscores = (P - onehot(y)) / n (losses.softmax_cross_entropy, no smoothing).
 * Each row's maximum is subtracted first; the sum of exponentials is taken in double. */
KERNEL static double
softmax_xent_impl(const float *restrict s, const int64_t *restrict y, Py_ssize_t n, Py_ssize_t K, float *restrict g)
{
    double total = 0.0;
    const float fn = (float)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *row = s + i * K;
        float *grow = g + i * K;
        float mx = row[0];
        for (Py_ssize_t k = 1; k < K; k++) mx = row[k] > mx ? row[k] : mx;
        double sum = 0.0;  /* p_k = exp(s_k - max) / sum_k exp(s_k - max) */
        for (Py_ssize_t k = 0; k < K; k++) {
            grow[k] = expf(row[k] - mx);
            sum += grow[k];
        }
        const float inv = (float)(1.0 / sum);
        for (Py_ssize_t k = 0; k < K; k++) {
            float p = grow[k] * inv;
            grow[k] = (k == y[i] ? p - 1.0f : p) / fn;
        }
        total += log(sum) - (row[y[i]] - mx);  /* -log p_y */
    }
    return total;
}

static PyObject *
softmax_xent(PyObject *self, PyObject *args)
{
    Py_buffer sc, lab, dsc;
    Py_ssize_t n, K;
    if (!PyArg_ParseTuple(args, "y*y*nnw*", &sc, &lab, &n, &K, &dsc))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t nK, n_labels;
    int64_t *y = NULL;
    if (n < 1 || K < 1) {
        PyErr_SetString(PyExc_ValueError, "softmax_xent needs at least one row and class");
        goto done;
    }
    if (!bytes_of(n, K, 1, 4, &nK) || !(y = copy_int64(&lab, &n_labels, "y")))
        goto done;
    if (!check_len(&sc, nK, "scores") || !check_len(&dsc, nK, "dscores"))
        goto done;
    if (n_labels != n) {
        PyErr_Format(PyExc_ValueError, "y: expected %zd labels, got %zd", n, n_labels);
        goto done;
    }
    const float *s = sc.buf;
    float *g = dsc.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (y[i] < 0 || y[i] >= K) {
            PyErr_Format(PyExc_IndexError, "label %lld is out of range for %zd classes",
                         (long long)y[i], K);
            goto done;
        }
    }
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = softmax_xent_impl(s, y, n, K, g);
    Py_END_ALLOW_THREADS
    ret = PyFloat_FromDouble(total / n);
done:
    free(y);
    PyBuffer_Release(&sc); PyBuffer_Release(&lab); PyBuffer_Release(&dsc);
    return ret;
}

KERNEL static void
axpy_impl(float *restrict y, const float *restrict x, float a, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* y += (float)a * x over n float32s: the L2 term 2 lambda W added to a gradient, or,
 * with a = -lr, the plain gradient-descent update p -= lr g (kernels.sgd_step). */
static PyObject *
add_scaled(PyObject *self, PyObject *args)
{
    Py_buffer y, x;
    double a;
    if (!PyArg_ParseTuple(args, "w*y*d", &y, &x, &a))
        return NULL;
    PyObject *ret = NULL;
    if (!same_floats(&y, &x))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    axpy_impl(y.buf, x.buf, (float)a, y.len / 4);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&y); PyBuffer_Release(&x);
    return ret;
}

/* p -= lr (g + l2 p) over L floats; with l2 == 0, p -= lr g (sgd_step). */
KERNEL static void
sgd_l2_block(float *restrict p, const float *restrict g, float lr, float l2, Py_ssize_t L)
{
    if (l2 == 0.0f) {  /* p -= lr g, exactly (also where p is not finite) */
        for (Py_ssize_t j = 0; j < L; j++) p[j] -= lr * g[j];
        return;
    }
    for (Py_ssize_t j = 0; j < L; j++) {
        float t = g[j] + l2 * p[j];
        p[j] -= lr * t;
    }
}

/* sgd_l2_block with l2 != 0, returning the sum of the updated p^2 in double, from the
 * same pass (the next step's L2 penalty): sixteen independent sums, so the loop
 * vectorizes; p is rounded exactly as in sgd_l2_block. */
KERNEL static double
sgd_l2_block_sq(float *restrict p, const float *restrict g, float lr, float l2, Py_ssize_t L)
{
    double acc[16] = {0.0};
    Py_ssize_t j = 0;
    for (; j + 16 <= L; j += 16)
        for (int k = 0; k < 16; k++) {
            float t = g[j + k] + l2 * p[j + k];
            float v = p[j + k] - lr * t;
            p[j + k] = v;
            acc[k] += (double)v * v;
        }
    for (; j < L; j++) {
        float t = g[j] + l2 * p[j];
        p[j] -= lr * t;
        acc[j % 16] += (double)p[j] * p[j];
    }
    double s = 0.0;
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
}

/* acc[j] += p[j]^2 in double over one row: no chain of dependent additions, so the
 * loop vectorizes (a running sum over j would not, without -ffast-math). */
KERNEL static void
add_squares(double *restrict acc, const float *restrict p, Py_ssize_t n)
{
    for (Py_ssize_t j = 0; j < n; j++) acc[j] += (double)p[j] * p[j];
}

/* The update of T stacked parameters, trial t with its own lr[t] and l2[t] (float64,
 * rounded to float32 as the lone update's are):
 *     p -= (float)lr[t] * (g + (float)l2[t] * p)      (optim.SGD with its L2 term)
 * p and g hold n float32s, read as rows of T blocks of L, block t of each row belonging
 * to trial t (a stacked (T, ...) array: one row; the wide first layer (d, T L): d rows).
 * sq (T float64s, or None; never overlapping p) gets the sum of squares of each trial's
 * updated values, the next step's L2 penalty. With T = 1 and L = n it is the update of one weight matrix
 * (add_scaled then add_scaled with -lr, rounded the same way). */
static PyObject *
sgd_l2_step(PyObject *self, PyObject *args)
{
    Py_buffer p, g, lr, l2, sq = {0};
    Py_ssize_t T, L, rowlen;
    PyObject *sq_obj;
    if (!PyArg_ParseTuple(args, "w*y*y*y*nnO", &p, &g, &lr, &l2, &T, &L, &sq_obj))
        return NULL;
    int want_sq = sq_obj != Py_None;
    if (want_sq && PyObject_GetBuffer(sq_obj, &sq, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&p); PyBuffer_Release(&g); PyBuffer_Release(&lr);
        PyBuffer_Release(&l2);
        return NULL;
    }
    PyObject *ret = NULL;
    double *lrs = NULL, *acc = NULL;
    Py_ssize_t t8;
    if (T < 1 || L < 1) {
        PyErr_SetString(PyExc_ValueError, "T and L must be positive");
        goto done;
    }
    if (!bytes_of(T, 1, 1, 8, &t8) || !size_mul(T, L, &rowlen) || !same_floats(&p, &g) ||
        !check_len(&lr, t8, "lr") || !check_len(&l2, t8, "l2") ||
        (want_sq && !check_len(&sq, t8, "sq")))
        goto done;
    if ((p.len / 4) % rowlen) {
        PyErr_Format(PyExc_ValueError, "%zd floats are not whole rows of %zd blocks of %zd",
                     p.len / 4, T, L);
        goto done;
    }
    /* a private copy of lr and l2, which another thread could change without the GIL */
    if (!(lrs = malloc(2 * (size_t)T * sizeof(double)))) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(lrs, lr.buf, (size_t)T * 8);
    memcpy(lrs + T, l2.buf, (size_t)T * 8);
    Py_ssize_t rows = p.len / 4 / rowlen;
    /* (rows > 0, so rowlen <= n: the accumulator is never larger than p) */
    if (want_sq && rows > 0 && !(acc = calloc((size_t)rowlen, sizeof(double)))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    float *pp = p.buf;
    const float *gg = g.buf;
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *row = pp + r * rowlen;
        for (Py_ssize_t t = 0; t < T; t++)  /* block t of each row is trial t's */
            sgd_l2_block(row + t * L, gg + r * rowlen + t * L, (float)lrs[t],
                         (float)lrs[T + t], L);
        if (want_sq)
            add_squares(acc, row, rowlen);
    }
    if (want_sq) {
        double *out = sq.buf;
        for (Py_ssize_t t = 0; t < T; t++) {
            double s[4] = {0.0, 0.0, 0.0, 0.0};  /* four chains of additions, not one */
            for (Py_ssize_t j = 0; acc && j < L; j++) s[j % 4] += acc[t * L + j];
            out[t] = (s[0] + s[1]) + (s[2] + s[3]);
        }
    }
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    free(lrs);
    free(acc);
    PyBuffer_Release(&p); PyBuffer_Release(&g); PyBuffer_Release(&lr);
    PyBuffer_Release(&l2);
    if (want_sq)
        PyBuffer_Release(&sq);
    return ret;
}

/* The SGD update of a whole network in one call: for every i,
 *     ps[i] -= (float)lr * (gs[i] + (float)l2s[i] * ps[i])      (l2s[i] == 0: ps[i] -= lr gs[i])
 * ps and gs are sequences of float32 buffers (pairwise of one length), l2s a buffer of
 * len(ps) float64s. Every buffer is acquired and checked before any is written, so a bad
 * argument raises and leaves all parameters as they were. Saves a Python call per
 * parameter (34 of them in the 9-layer net with batch norm). sq (len(ps) float64s, or
 * None) gets, for each i with l2s[i] != 0, the sum of squares of the updated ps[i],
 * from the same pass (the next step's L2 penalty, with no pass of its own); 0 for the
 * others. */
static PyObject *
sgd_many(PyObject *self, PyObject *args)
{
    PyObject *ps_obj, *gs_obj, *sq_obj = Py_None, *ps = NULL, *gs = NULL;
    Py_buffer l2, sq = {0}, *bufs = NULL;
    double lr;
    if (!PyArg_ParseTuple(args, "OOdy*|O", &ps_obj, &gs_obj, &lr, &l2, &sq_obj))
        return NULL;
    int want_sq = sq_obj != Py_None;
    if (want_sq && PyObject_GetBuffer(sq_obj, &sq, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&l2);
        return NULL;
    }
    PyObject *ret = NULL;
    Py_ssize_t n = 0, got = 0;
    double *l2s = NULL, *sqs = NULL;
    /* tuples of our own: a list could be changed while its items' buffers are taken */
    if (!(ps = PySequence_Tuple(ps_obj)) || !(gs = PySequence_Tuple(gs_obj)))
        goto done;
    n = PyTuple_GET_SIZE(ps);
    if (PyTuple_GET_SIZE(gs) != n || l2.len != n * 8 || (want_sq && sq.len != n * 8)) {
        PyErr_Format(PyExc_ValueError, "%zd parameters, %zd gradients, %zd bytes of l2 "
                     "and %zd bytes of sq", n, PyTuple_GET_SIZE(gs), l2.len, want_sq ? sq.len : 0);
        goto done;
    }
    if (!(bufs = calloc((size_t)(2 * n + 1), sizeof(Py_buffer))) ||
        !(l2s = malloc((size_t)(2 * n + 1) * sizeof(double)))) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(l2s, l2.buf, (size_t)n * 8);  /* a private copy, as in sgd_l2_step */
    sqs = l2s + n;  /* the sums, copied out only once every update is done */
    for (; got < n; got++) {
        Py_buffer *p = &bufs[2 * got], *g = &bufs[2 * got + 1];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(ps, got), p,
                               PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(gs, got), g, PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(p);
            goto done;
        }
        if (!same_floats(p, g)) {
            got++;  /* both of this pair are held: release them below */
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        float *p = bufs[2 * i].buf;
        const float *g = bufs[2 * i + 1].buf;
        Py_ssize_t L = bufs[2 * i].len / 4;
        sqs[i] = 0.0;
        if (want_sq && (float)l2s[i] != 0.0f)
            sqs[i] = sgd_l2_block_sq(p, g, (float)lr, (float)l2s[i], L);
        else
            sgd_l2_block(p, g, (float)lr, (float)l2s[i], L);
    }
    if (want_sq)
        memcpy(sq.buf, sqs, (size_t)n * 8);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&bufs[2 * i]);
        PyBuffer_Release(&bufs[2 * i + 1]);
    }
    free(bufs);
    free(l2s);
    Py_XDECREF(ps);
    Py_XDECREF(gs);
    PyBuffer_Release(&l2);
    if (want_sq)
        PyBuffer_Release(&sq);
    return ret;
}

/* The momentum update of one parameter (torch's SGD(momentum=mu[, nesterov=True]), as
 * optim.Momentum and optim.Nesterov do it in NumPy, each float32 operation rounded as
 * there, no FMA): g += l2 p (when l2 != 0; g keeps the term, as add_scaled leaves it),
 * v = g on the first step, else v = v mu + g, then p -= (v mu + g) lr (Nesterov) or
 * p -= v lr. One pass over p, g and v instead of NumPy's five or six. Returns the sum
 * of the updated p^2 in double (the next step's L2 penalty), from sixteen independent
 * sums so that the loop vectorizes, as sgd_l2_block_sq's. */
static inline float
momentum_one(float *restrict p, float *restrict g, float *restrict v, float lr, float mu,
             float l2, int nesterov, int first)
{
    float gj = *g;
    if (l2 != 0.0f) {
        gj = gj + l2 * *p;
        *g = gj;
    }
    float vj = first ? gj : *v * mu + gj;
    *v = vj;
    return *p -= nesterov ? (vj * mu + gj) * lr : vj * lr;
}

KERNEL static double
momentum_block(float *restrict p, float *restrict g, float *restrict v, float lr, float mu,
               float l2, int nesterov, int first, Py_ssize_t n)
{
    double acc[16] = {0.0};
    Py_ssize_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) {
            float pj = momentum_one(p + j + k, g + j + k, v + j + k, lr, mu, l2, nesterov, first);
            acc[k] += (double)pj * pj;
        }
    for (; j < n; j++) {
        float pj = momentum_one(p + j, g + j, v + j, lr, mu, l2, nesterov, first);
        acc[j % 16] += (double)pj * pj;
    }
    double sum = 0.0;
    for (int k = 0; k < 16; k++) sum += acc[k];
    return sum;
}

static PyObject *
momentum_step(PyObject *self, PyObject *args)
{
    Py_buffer p, g, v;
    double lr, mu, l2, sum = 0.0;
    int nesterov, first;
    if (!PyArg_ParseTuple(args, "w*w*w*dddpp", &p, &g, &v, &lr, &mu, &l2, &nesterov, &first))
        return NULL;
    PyObject *ret = NULL;
    if (!same_floats(&p, &g) || !check_len(&v, p.len, "v"))
        goto done;
    if (overlap(&p, &g) || overlap(&p, &v) || overlap(&g, &v)) {  /* restrict, below */
        PyErr_SetString(PyExc_ValueError, "p, g and v must not overlap");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    sum = momentum_block(p.buf, g.buf, v.buf, (float)lr, (float)mu, (float)l2, nesterov,
                         first, p.len / 4);
    Py_END_ALLOW_THREADS
    ret = PyFloat_FromDouble(sum);
done:
    PyBuffer_Release(&p); PyBuffer_Release(&g); PyBuffer_Release(&v);
    return ret;
}

/* C (n x m) = A B, A^T B (trans_a; A stored d x n) or A B^T (trans_b; B stored m x d),
 * all float32 and C-contiguous, by klayer's own kernels (_gemm.c) on `threads` threads.
 * Returns False, leaving C as it was, where this CPU has no such kernel. */
static PyObject *
matmul(PyObject *self, PyObject *args)
{
    Py_buffer a, b, c;
    Py_ssize_t n, d, m, want;
    int trans_a, trans_b, threads, ok = 0;
    if (!PyArg_ParseTuple(args, "y*y*w*nnnppi", &a, &b, &c, &n, &d, &m, &trans_a, &trans_b,
                          &threads))
        return NULL;
    PyObject *ret = NULL;
    if (!bytes_of(n, d, 1, 4, &want) || !check_len(&a, want, "A") ||
        !bytes_of(d, m, 1, 4, &want) || !check_len(&b, want, "B") ||
        !bytes_of(n, m, 1, 4, &want) || !check_len(&c, want, "C"))
        goto done;
    if (overlap(&c, &a) || overlap(&c, &b)) {
        PyErr_SetString(PyExc_ValueError, "the output overlaps an operand");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = klayer_gemm(a.buf, b.buf, c.buf, n, d, m, trans_a, trans_b, threads);
    Py_END_ALLOW_THREADS
    ret = PyBool_FromLong(ok);
done:
    PyBuffer_Release(&a); PyBuffer_Release(&b); PyBuffer_Release(&c);
    return ret;
}

/* gemm_level() -> (the best instruction set this CPU has for matmul, the one in use):
 * 2 AVX-512F, 1 AVX2 with FMA, 0 none. gemm_level(level) first selects `level`
 * (1 .. the best), for tests and benchmarks of the narrower kernels. */
static PyObject *
gemm_level(PyObject *self, PyObject *args)
{
    int level = -1;
    if (!PyArg_ParseTuple(args, "|i", &level))
        return NULL;
    if (level != -1 && !klayer_gemm_select(level)) {
        PyErr_Format(PyExc_ValueError, "matmul's kernels cannot run at level %d on this CPU "
                     "(best: %d)", level, klayer_gemm_best());
        return NULL;
    }
    return Py_BuildValue("(ii)", klayer_gemm_best(), klayer_gemm_level());
}

static PyMethodDef methods[] = {
    {"gather_standardize", gather_standardize, METH_VARARGS, "gather and standardize rows"},
    {"move_images", move_images, METH_VARARGS, "mirror and shift images, zero-filled"},
    {"bn_relu_forward", bn_relu_forward, METH_VARARGS, "batch norm then ReLU, training mode"},
    {"bn_relu_backward", bn_relu_backward, METH_VARARGS, "backward of bn_relu_forward"},
    {"softmax_xent", softmax_xent, METH_VARARGS, "softmax cross-entropy and its gradient"},
    {"add_scaled", add_scaled, METH_VARARGS, "y += a x"},
    {"sgd_many", sgd_many, METH_VARARGS, "the SGD update of many parameters"},
    {"sgd_l2_step", sgd_l2_step, METH_VARARGS, "p -= lr (g + l2 p) per block, and sum p^2"},
    {"momentum_step", momentum_step, METH_VARARGS, "the momentum or Nesterov update"},
    {"matmul", matmul, METH_VARARGS, "C = A B, A^T B or A B^T, float32, klayer's kernels"},
    {"gemm_level", gemm_level, METH_VARARGS, "matmul's instruction set: (best, in use)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "klayer.core._kernels",
    "Fused float32 kernels for klayer's training step; see klayer.kernels.", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
