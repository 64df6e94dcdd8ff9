//! snfc runtime: backends (host executor), data loading, training, evaluation and sampling.
