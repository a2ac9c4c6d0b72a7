//! Template helpers a Russian marketplace needs: roubles, dates in a time
//! zone, plural forms, defaults and truncation. Handlebars' strict mode does
//! not check helper arguments, so each helper refuses a missing one itself:
//! a hole in a buyer's message is an error, never an empty string.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use handlebars::{
    Context, Handlebars, Helper, HelperResult, Output, PathAndJson, RenderContext, RenderError,
    RenderErrorReason,
};
use serde_json::Value;

pub const DEFAULT_TIME_ZONE: &str = "Europe/Moscow";
pub const DEFAULT_DATE_FORMAT: &str = "%d.%m.%Y";

pub fn register(hb: &mut Handlebars<'_>) {
    hb.register_helper("rub", Box::new(rub));
    hb.register_helper("date", Box::new(date));
    hb.register_helper("plural", Box::new(plural));
    hb.register_helper("default", Box::new(default));
    hb.register_helper("truncate", Box::new(truncate));
    hb.register_helper(super::strict::TEXT_HELPER, Box::new(text));
}

fn fail(helper: &str, why: impl std::fmt::Display) -> RenderError {
    RenderErrorReason::Other(format!("helper {helper}: {why}")).into()
}

/// The argument at `index`, refusing one that names a missing field.
fn required<'a>(h: &'a Helper<'_>, helper: &str, index: usize) -> Result<&'a Value, RenderError> {
    let param = h
        .param(index)
        .ok_or_else(|| fail(helper, format!("argument {} is required", index + 1)))?;
    if param.is_value_missing() {
        return Err(fail(
            helper,
            format!("{} is missing from the event", describe(param)),
        ));
    }
    Ok(param.value())
}

fn describe(param: &PathAndJson<'_>) -> String {
    param
        .relative_path()
        .map(|p| format!("field {p:?}"))
        .unwrap_or_else(|| "the argument".into())
}

fn as_number(helper: &str, v: &Value) -> Result<f64, RenderError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| fail(helper, "number out of range")),
        Value::String(s) => s
            .trim()
            .replace(',', ".")
            .parse::<f64>()
            .map_err(|_| fail(helper, format!("{s:?} is not a number"))),
        other => Err(fail(helper, format!("{other} is not a number"))),
    }
}

/// Every `{{value}}` printed into the text (see `strict`): a scalar as
/// Handlebars prints it (null as nothing), an object or a list refused.
fn text(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let param = h
        .param(0)
        .ok_or_else(|| fail("__text", "argument 1 is required"))?;
    if param.is_value_missing() {
        return Err(RenderErrorReason::MissingVariable(param.relative_path().cloned()).into());
    }
    out.write(&scalar_text(param)?)?;
    Ok(())
}

/// The text of a value; an object or a list is an error that says what to
/// write instead, naming the field.
fn scalar_text(param: &PathAndJson<'_>) -> Result<String, RenderError> {
    let field = param.relative_path();
    match param.value() {
        Value::Object(map) => {
            let keys: Vec<&str> = map.keys().map(String::as_str).take(6).collect();
            let example = keys.first().copied().unwrap_or("name");
            let why = match field {
                Some(f) => format!(
                    "field {f:?} is an object ({{{}}}), not text: write one of its fields, such as {{{{{f}.{example}}}}}, or use {{{{#with {f}}}}}…{{{{/with}}}}",
                    keys.join(", ")
                ),
                None => format!(
                    "the value printed here is an object ({{{}}}), not text: print one of its fields instead",
                    keys.join(", ")
                ),
            };
            Err(RenderErrorReason::Other(why).into())
        }
        Value::Array(items) => {
            let why = match field {
                Some(f) => format!(
                    "field {f:?} is a list of {} item(s), not text: write {{{{len {f}}}}} for its size, {{{{{f}.[0]}}}} for the first item, or {{{{#each {f}}}}}…{{{{/each}}}}",
                    items.len()
                ),
                None => format!(
                    "the value printed here is a list of {} item(s), not text: print one of its items or its size instead",
                    items.len()
                ),
            };
            Err(RenderErrorReason::Other(why).into())
        }
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => Ok(other.to_string()),
    }
}

/// `{{rub amount}}` → `1 234,50 ₽` (kopecks shown only when there are any).
fn rub(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let amount = as_number("rub", required(h, "rub", 0)?)?;
    // Beyond this, f64 no longer holds kopecks exactly: not a real price.
    if !amount.is_finite() || amount.abs() > 1e15 {
        return Err(fail(
            "rub",
            format!("{amount} is not a plausible amount in roubles"),
        ));
    }
    out.write(&format_roubles(amount))?;
    Ok(())
}

pub fn format_roubles(amount: f64) -> String {
    let kopecks = (amount * 100.0).round() as i128;
    let sign = if kopecks < 0 { "-" } else { "" };
    let kopecks = kopecks.unsigned_abs();
    let digits = (kopecks / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(' ');
        }
        grouped.push(c);
    }
    match kopecks % 100 {
        0 => format!("{sign}{grouped} ₽"),
        k => format!("{sign}{grouped},{k:02} ₽"),
    }
}

/// `{{date value "%d.%m.%Y %H:%M" "Europe/Moscow"}}`; value is RFC 3339,
/// a plain `YYYY-MM-DD` date, or Unix seconds. Format and zone may also be
/// given as `format=` and `tz=`.
fn date(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let value = required(h, "date", 0)?;
    let text_arg = |index: usize, name: &str, fallback: &str| -> Result<String, RenderError> {
        let v = h
            .param(index)
            .map(|p| p.value())
            .or_else(|| h.hash_get(name).map(|p| p.value()));
        match v {
            None => Ok(fallback.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(fail(
                "date",
                format!("{name} must be a string, got {other}"),
            )),
        }
    };
    let format = text_arg(1, "format", DEFAULT_DATE_FORMAT)?;
    let zone: chrono_tz::Tz = text_arg(2, "tz", DEFAULT_TIME_ZONE)?.parse().map_err(|_| {
        fail(
            "date",
            "unknown time zone (write an IANA name such as Europe/Moscow)",
        )
    })?;
    let instant: DateTime<Utc> = match value {
        Value::Number(n) => n
            .as_i64()
            .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
            .ok_or_else(|| fail("date", format!("{n} is not a Unix time in seconds")))?,
        Value::String(s) => parse_instant(s).ok_or_else(|| {
            fail(
                "date",
                format!(
                    "{s:?} is not a date (RFC 3339 like 2026-11-25T10:00:00+03:00, or 2026-11-25)"
                ),
            )
        })?,
        other => return Err(fail("date", format!("{other} is not a date"))),
    };
    let mut rendered = String::new();
    use std::fmt::Write;
    write!(rendered, "{}", instant.with_timezone(&zone).format(&format))
        .map_err(|_| fail("date", format!("bad format {format:?}")))?;
    out.write(&rendered)?;
    Ok(())
}

fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // A bare date means that day in Moscow, where the Market keeps its calendar.
    let day = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let zone: chrono_tz::Tz = DEFAULT_TIME_ZONE.parse().ok()?;
    zone.from_local_datetime(&day.and_hms_opt(12, 0, 0)?)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// `{{plural count "товар" "товара" "товаров"}}` → the word for the count.
fn plural(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let n = as_number("plural", required(h, "plural", 0)?)?;
    let forms: Vec<&str> = (1..=3)
        .map(|i| match required(h, "plural", i)? {
            Value::String(s) => Ok(s.as_str()),
            other => Err(fail(
                "plural",
                format!("form {i} must be a string, got {other}"),
            )),
        })
        .collect::<Result<_, _>>()?;
    out.write(forms[russian_plural_form(n.abs().trunc() as u64)])?;
    Ok(())
}

/// 0: один товар, 1: два товара, 2: пять товаров.
pub fn russian_plural_form(n: u64) -> usize {
    match (n % 10, n % 100) {
        (1, m) if m != 11 => 0,
        (2..=4, m) if !(12..=14).contains(&m) => 1,
        _ => 2,
    }
}

/// `{{default field "—"}}`: the field, or the fallback when it is missing, null or "".
fn default(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    required(h, "default", 1)?;
    let value = h.param(0).filter(|p| !p.is_value_missing());
    let chosen = match value.map(|p| p.value()) {
        None | Some(Value::Null) => h.param(1),
        Some(Value::String(s)) if s.is_empty() => h.param(1),
        Some(_) => value,
    };
    match chosen {
        Some(p) => out.write(&scalar_text(p)?)?,
        None => return Err(fail("default", "argument 2 is required")),
    }
    Ok(())
}

/// `{{truncate text 100}}` or `{{truncate text 100 "..."}}`: at most that many
/// characters, the suffix (default `…`) included when cut.
fn truncate(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    required(h, "truncate", 0)?;
    let text = h.param(0).map(scalar_text).transpose()?.unwrap_or_default();
    let limit = match required(h, "truncate", 1)? {
        Value::Number(n) => n.as_u64().filter(|&n| n > 0),
        _ => None,
    }
    .ok_or_else(|| fail("truncate", "the length must be a positive integer"))?
        as usize;
    let suffix = match h.param(2).map(|p| p.value()) {
        Some(Value::String(s)) => s.clone(),
        _ => "…".to_owned(),
    };
    out.write(&truncate_chars(&text, limit, &suffix))?;
    Ok(())
}

pub fn truncate_chars(text: &str, limit: usize, suffix: &str) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    let keep = limit.saturating_sub(suffix.chars().count());
    let mut cut: String = text.chars().take(keep).collect();
    cut.push_str(suffix);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roubles_are_grouped_with_comma_kopecks() {
        assert_eq!(format_roubles(1234.5), "1 234,50 ₽");
        assert_eq!(format_roubles(1_000_000.0), "1 000 000 ₽");
        assert_eq!(format_roubles(99.99), "99,99 ₽");
        assert_eq!(format_roubles(0.0), "0 ₽");
        assert_eq!(format_roubles(-15.05), "-15,05 ₽");
    }

    #[test]
    fn russian_plurals_follow_the_grammar() {
        let word = |n| ["товар", "товара", "товаров"][russian_plural_form(n)];
        assert_eq!(word(1), "товар");
        assert_eq!(word(2), "товара");
        assert_eq!(word(5), "товаров");
        assert_eq!(word(11), "товаров");
        assert_eq!(word(12), "товаров");
        assert_eq!(word(21), "товар");
        assert_eq!(word(22), "товара");
        assert_eq!(word(111), "товаров");
        assert_eq!(word(0), "товаров");
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        assert_eq!(truncate_chars("привет мир", 7, "…"), "привет…");
        assert_eq!(truncate_chars("коротко", 7, "…"), "коротко");
    }
}
