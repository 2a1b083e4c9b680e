/* A small pool of threads for klayer's matrix products (_pool.c). */
#ifndef KLAYER_POOL_H
#define KLAYER_POOL_H

/* One part of a job: part p of `parts`, each writing its own share of the output. */
typedef void (*klayer_part)(const void *job, int p, int parts);

/* Runs part(job, p, P) for p = 0 .. P - 1, part 0 on the calling thread and the others
 * on helper threads kept between calls, and returns when all are done. P is `parts`
 * (at most KLAYER_MAX_THREADS), or fewer when helpers cannot be started. One job runs
 * at a time; a forked child starts helpers of its own. */
void klayer_run_parts(klayer_part part, const void *job, int parts);

#define KLAYER_MAX_THREADS 64

#endif
