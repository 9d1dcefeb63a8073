//! The memory allocator of both binaries, declared in the crate they share so
//! that `hs-main`, `hs-worker` and the benchmarks that stand in for them (the
//! persist bench imports in a child of its own) allocate the same way.
//!
//! jemalloc keeps a cache per thread where glibc's malloc takes an arena lock
//! and walks its bins: an import's parsing and contexts allocate and free
//! millions of small strings and maps, a request a few hundred. SQLite, linked
//! in, resolves its `malloc` to jemalloc's too (the crate's unprefixed feature).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
