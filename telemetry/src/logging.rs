//! The one place that sets up tracing for refvote's daemons (votingd, the router).

/// Logs to stderr (the journal under systemd), filtered by `RUST_LOG` (default
/// `info`). `REFVOTE_LOG_FORMAT=json` writes one JSON object a line, with the span
/// fields (`repo`, `tx`, `method`...), for log collectors; anything else, text.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("REFVOTE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}
