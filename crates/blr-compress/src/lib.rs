//! Dense -> block-low-rank compression: SVD low-rank, Monarch projection, BLAST preconditioned factorization, calibrated variants, rank allocation.
