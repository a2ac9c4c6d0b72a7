//! `/metrics` read as a monitoring system reads it: the Prometheus text
//! exposition format parsed into samples, and scrapes of a test app.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::helpers::*;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format: `name{k="v",...} value
/// [timestamp]` per line; `#` lines (HELP, TYPE) and blank lines skipped.
pub(crate) fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("bad metrics line {l:?}: {e}")))
        .collect()
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // Skip separators; `}` ends the set.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            let (start, c) = chars.next().ok_or("unterminated labels")?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let mut key = String::from(c);
            loop {
                let (_, c) = chars.next().ok_or("unterminated label name")?;
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next().ok_or("unterminated label value")?;
                match c {
                    '"' => break,
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => return Err("dangling escape".into()),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
    }
    let raw = rest.split_whitespace().next().ok_or("no value")?;
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[test]
fn the_prometheus_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP x_total a help\n# TYPE x_total counter\n\
                x_total{code=\"\",status=\"200\"} 3\n\
                y{a=\"q\\\"uo,te\",b=\"new\\nline\"} 1.5 1700000000\n\
                z 0\n\
                h_bucket{le=\"+Inf\"} +Inf\n";
    let samples = parse_prometheus(text);
    assert_eq!(samples.len(), 4);
    assert_eq!(
        samples[0].labels,
        BTreeMap::from([("code".into(), "".into()), ("status".into(), "200".into())])
    );
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(samples[1].labels["a"], "q\"uo,te");
    assert_eq!(samples[1].labels["b"], "new\nline");
    assert_eq!(samples[1].value, 1.5);
    assert_eq!((samples[2].name.as_str(), samples[2].value), ("z", 0.0));
    assert!(samples[3].value.is_infinite());
}

/// The value of the sample with exactly these labels.
pub(crate) fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

pub(crate) async fn scrape(app: &TestApp) -> Vec<Sample> {
    let mut resp = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = resp.body().limit(4 << 20).await.unwrap();
    parse_prometheus(std::str::from_utf8(&body).expect("UTF-8 metrics"))
}

/// Scrapes until the sample has the value (bounded, real time): some
/// gauges follow the dispatcher's next round.
pub(crate) async fn wait_metric(app: &TestApp, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(app).await;
        let got = metric(&samples, name, labels);
        if got == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            let related: Vec<_> = samples.iter().filter(|s| s.name == name).collect();
            panic!("{name}{labels:?} is {got:?}, not {want}; samples: {related:#?}");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}
