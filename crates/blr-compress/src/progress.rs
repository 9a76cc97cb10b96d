//! Progress reporting without printing: the library calls a [`Progress`] implementation, the
//! CLI hooks it to an indicatif bar, the whole-model compressor to its own per-layer display,
//! tests to [`Silent`].

/// Receives progress events from a factorization. Methods take `&self` and the trait is `Sync`
/// because Monarch and the per-block solves report from rayon worker threads.
pub trait Progress: Sync {
    /// A stage (for example "blast" or "monarch blocks") begins with `total` steps.
    fn begin(&self, _stage: &str, _total: usize) {}
    /// `done` steps of the current stage are finished; `rel_error` is the current relative
    /// error (in the norm being minimised) when the algorithm knows it.
    fn advance(&self, _done: usize, _rel_error: Option<f64>) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {}
