//! snfc compiler: spec -> IR -> exact training graph -> e-graph rewrites.
