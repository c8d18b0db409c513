//! The two exposition formats a scraper may ask for.
//!
//! prometheus-client writes OpenMetrics 1.0. Prometheus chooses its parser
//! from the response's Content-Type, and its classic text parser (format
//! 0.0.4, what `promtool check metrics` and older scrapers read) rejects
//! OpenMetrics-only types (`info`, `stateset`) and the `# EOF` line. So we
//! answer OpenMetrics only when the `Accept` header asks for it, and
//! otherwise rewrite the same text into the classic format.

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which format an `Accept` header asks for: OpenMetrics when it lists
/// `application/openmetrics-text` with a non-zero quality at least that of
/// `text/plain`, the classic format otherwise (including no header at all).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let quality = |wanted: &str| {
        accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next()?;
                if !media.eq_ignore_ascii_case(wanted) {
                    return None;
                }
                let q = parts
                    .filter_map(|p| p.strip_prefix("q="))
                    .find_map(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0);
                Some(q)
            })
            .fold(None, |best: Option<f32>, q| Some(best.map_or(q, |b| b.max(q))))
    };
    match (quality("application/openmetrics-text"), quality("text/plain")) {
        (Some(om), Some(text)) => om > 0.0 && om >= text,
        (Some(om), None) => om > 0.0,
        _ => false,
    }
}

/// Rewrites OpenMetrics text (as prometheus-client writes it) into the
/// classic text format 0.0.4:
/// - a counter family `x` has samples `x_total`: its HELP and TYPE lines are
///   renamed to `x_total`, and `x_created` samples are dropped;
/// - an `info` family `x` (sample `x_info`) becomes gauge `x_info`;
/// - `stateset` becomes a gauge, `unknown` becomes `untyped`;
/// - `# UNIT` and `# EOF` are dropped (the classic format has neither).
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // (family name, its type) of the family being written.
    let mut family: Option<(String, String)> = None;
    // Each family's HELP line comes before its TYPE; hold it until we know
    // the name it must carry.
    let mut pending_help: Option<(String, String)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name.to_string(), help.to_string()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (classic_name, classic_kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_string(), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                "gaugehistogram" => (name.to_string(), "histogram"),
                other => (name.to_string(), other),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {classic_name} {}\n", classic_help(&help)));
                }
            }
            out.push_str(&format!("# TYPE {classic_name} {classic_kind}\n"));
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some((name, kind)) = &family {
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            if kind == "counter" && sample == format!("{name}_created") {
                continue;
            }
        }
        out.push_str(strip_exemplar(line));
        out.push('\n');
    }
    out
}

/// OpenMetrics escapes `"` in HELP text; the classic format does not
/// (only backslash and newline), so an escaped quote is written plainly.
fn classic_help(help: &str) -> String {
    help.replace("\\\"", "\"")
}

/// Drops an exemplar (` # {labels} value`) after a sample's value: the
/// classic format has none. Label values may hold `#`, so only a `#` after
/// the closing brace of the label set counts.
fn strip_exemplar(line: &str) -> &str {
    let after_labels = match line.find('{') {
        Some(_) => closing_brace(line).map_or(0, |i| i + 1),
        None => 0,
    };
    match line[after_labels..].find(" # ") {
        Some(i) => &line[..after_labels + i],
        None => line,
    }
}

/// The index of the `}` that closes a sample's label set, skipping quoted
/// label values with their escapes.
fn closing_brace(line: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_negotiation() {
        // What Prometheus 2.x sends: OpenMetrics first.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0.3,text/plain;version=0.0.4;q=0.9"
        )));
    }

    #[test]
    fn classic_rewrite() {
        let om = "# HELP rpcs Calls.\n# TYPE rpcs counter\nrpcs_total{code=\"OK\"} 3\n\
                  rpcs_created{code=\"OK\"} 1.7e9\n\
                  # HELP build Build \\\"x\\\".\n# TYPE build info\nbuild_info{v=\"1 # 2\"} 1\n\
                  # HELP lat Latency.\n# TYPE lat histogram\n# UNIT lat seconds\n\
                  lat_bucket{le=\"+Inf\"} 2 # {trace=\"a\"} 0.5\nlat_sum 1.0\nlat_count 2\n# EOF\n";
        let classic = to_classic(om);
        assert_eq!(
            classic,
            "# HELP rpcs_total Calls.\n# TYPE rpcs_total counter\nrpcs_total{code=\"OK\"} 3\n\
             # HELP build_info Build \"x\".\n# TYPE build_info gauge\nbuild_info{v=\"1 # 2\"} 1\n\
             # HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 2\n\
             lat_sum 1.0\nlat_count 2\n"
        );
    }
}
