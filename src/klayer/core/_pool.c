/* A small pool of threads for klayer's matrix products; see _pool.h.
 *
 * Helpers wait for a new job number; the caller runs part 0 itself and waits for the
 * others. Both sides spin briefly (SPIN_TICKS of the time-stamp counter, some tens of
 * microseconds) before sleeping: waking a sleeping thread costs tens of microseconds,
 * while a helper that spun for longer would take its core from BLAS's own threads,
 * which run the products between ours (an OpenBLAS worker spinning beside a klayer
 * helper halved the wide net's speed: docs/performance.md).
 */
#include "_pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)

#include <immintrin.h>
#include <pthread.h>
#include <stddef.h>

#define SPIN_TICKS 100000

/* Spin, at most SPIN_TICKS, while (*word == value) == same. */
static void
spin(const unsigned long *word, unsigned long value, int same)
{
    unsigned long long t0 = __rdtsc();
    while ((__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) == same
           && __rdtsc() - t0 < SPIN_TICKS)
        _mm_pause();
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t callers = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static klayer_part job_part;      /* the current job */
static const void *job;
static int job_parts;
static unsigned long job_no;      /* the current job's number; helpers run each once */
static unsigned long born[KLAYER_MAX_THREADS];  /* job_no when each helper was started */
static int helpers;
static unsigned long pending;     /* helpers yet to finish the job */

static void *
helper(void *arg)
{
    int id = (int)(ptrdiff_t)arg;   /* 1 .. helpers: this helper's part */
    unsigned long seen = born[id];  /* set before this thread was created */
    for (;;) {
        spin(&job_no, seen, 1);  /* while no new job */
        pthread_mutex_lock(&mu);
        while (job_no == seen) pthread_cond_wait(&wake, &mu);
        seen = job_no;
        klayer_part part = job_part;
        const void *g = job;
        int parts = job_parts;
        pthread_mutex_unlock(&mu);
        if (id < parts) part(g, id, parts);
        pthread_mutex_lock(&mu);
        if (__atomic_sub_fetch(&pending, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&done);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void
after_fork(void)  /* the child has none of the parent's helpers */
{
    pthread_mutex_init(&callers, NULL);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&done, NULL);
    helpers = 0;
    pending = 0;
}

static int
start_helpers(int want)
{
    static int hooked;
    if (!hooked) {
        if (pthread_atfork(NULL, NULL, after_fork) != 0) return 0;
        hooked = 1;
    }
    while (helpers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        born[helpers + 1] = job_no;
        int bad = pthread_create(&t, &attr, helper, (void *)(ptrdiff_t)(helpers + 1));
        pthread_attr_destroy(&attr);
        if (bad) return 0;
        helpers++;
    }
    return 1;
}

void
klayer_run_parts(klayer_part part, const void *g, int parts)
{
    pthread_mutex_lock(&callers);
    parts = parts < 1 ? 1 : parts > KLAYER_MAX_THREADS ? KLAYER_MAX_THREADS : parts;
    if (parts > 1 && !start_helpers(parts - 1))
        parts = 1 + helpers;  /* as many as there are */
    if (parts > 1) {  /* all helpers wake; those past the last part only count off */
        pthread_mutex_lock(&mu);
        job_part = part;
        job = g;
        job_parts = parts;
        __atomic_store_n(&pending, (unsigned long)helpers, __ATOMIC_RELAXED);
        __atomic_store_n(&job_no, job_no + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&mu);
    }
    part(g, 0, parts);
    if (parts > 1) {
        spin(&pending, 0, 0);  /* while helpers are still working */
        pthread_mutex_lock(&mu);
        while (pending > 0) pthread_cond_wait(&done, &mu);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_unlock(&callers);
}

#else  /* no pool where there are no kernels to run on it: each job runs here, whole */

void
klayer_run_parts(klayer_part part, const void *job, int parts)
{
    (void)parts;
    part(job, 0, 1);
}

#endif
