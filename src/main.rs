//! The `stepgate` command: `serve`, `check`, `token`, `decide`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// objects (protobuf decoding, JSON claims, answers) across worker threads, where glibc's
/// arenas showed up as 10-15 % of the CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    // One TLS crypto provider for every rustls user in the process (the OTLP exporter's and the
    // client commands' tonic channels among them): aws-lc, as for tokens and the listener. Both
    // aws-lc and ring are compiled in (reqwest brings ring), so rustls cannot pick one itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = cli::Cli::parse();
    cli::run(args)
}

/// Transparent huge pages off for this process. mimalloc's arenas are 2 MiB-aligned, so with THP
/// a few touched bytes brought a whole 2 MiB page into RSS: 10 MiB more after start, 13 MiB more
/// with 100 000 cached tokens, and steps of 2-4 MiB long after the cache was full (see README,
/// "Performance"). The `no_thp` build feature stops mimalloc from asking for them; this also
/// covers hosts where THP is `always`. Failure (an old kernel) leaves the host's setting.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE sets one flag of this process and reads no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
