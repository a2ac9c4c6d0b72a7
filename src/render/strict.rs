//! What plain Handlebars lets through silently, refused here. A compiled
//! template is walked once at load: a call to a helper or a partial that
//! does not exist is a load error (listing what does exist), and every
//! `{{value}}` that prints into the text goes through the `__text` helper,
//! which refuses an object or a list (Handlebars would print `[object]` or
//! `[a, b]` into a buyer's message). Blocks (`{{#each}}`, `{{#with}}`,
//! `{{#if obj}}`) are left alone: they take objects by design.

use std::collections::BTreeSet;

use handlebars::template::{Parameter, Subexpression, Template, TemplateElement};
use handlebars::Handlebars;

/// The helper every printed value passes through (registered in `helpers`).
pub const TEXT_HELPER: &str = "__text";

/// Our helpers: they write text themselves and check their own arguments.
pub const OUR_HELPERS: [&str; 5] = ["rub", "date", "plural", "default", "truncate"];

/// The Handlebars built-ins registered by default (`Handlebars::new()`);
/// a unit test checks the list against the registry.
pub const BUILTIN_HELPERS: [&str; 17] = [
    "if", "unless", "each", "with", "lookup", "eq", "ne", "gt", "gte", "lt", "lte", "and", "or",
    "not", "len", "log", "raw",
];

/// Is `name` a helper we register (the registry does not say)?
fn is_helper(name: &str) -> bool {
    name == TEXT_HELPER || OUR_HELPERS.contains(&name) || BUILTIN_HELPERS.contains(&name)
}

/// `rub, date, ... (ours); if, unless, ... (Handlebars built-ins)`.
pub fn known_helpers() -> String {
    format!(
        "{} (ours); {} (Handlebars built-ins)",
        OUR_HELPERS.join(", "),
        BUILTIN_HELPERS.join(", ")
    )
}

/// The known helper closest to a mistyped name, if one is close enough.
pub fn closest_helper(name: &str) -> Option<&'static str> {
    OUR_HELPERS
        .iter()
        .chain(BUILTIN_HELPERS.iter())
        .map(|h| (edit_distance(name, h), *h))
        .filter(|(d, h)| *d <= 2.max(h.len() / 3) && *d < h.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, h)| h)
}

pub fn unknown_helper_message(name: &str) -> String {
    let hint = closest_helper(name)
        .map(|h| format!("did you mean {h:?}? "))
        .unwrap_or_default();
    format!(
        "unknown helper {name:?}; {hint}known helpers: {}",
        known_helpers()
    )
}

pub fn unknown_partial_message(name: &str, partials: &BTreeSet<String>) -> String {
    let known = if partials.is_empty() {
        "none (put them in <templates.dir>/partials/NAME.hbs)".to_owned()
    } else {
        partials.iter().cloned().collect::<Vec<_>>().join(", ")
    };
    format!("unknown partial {name:?}; known partials: {known}")
}

/// Checks and rewrites one compiled template. Problems come back as
/// `line L, column C: what`.
pub fn harden(
    template: &mut Template,
    hb: &Handlebars<'_>,
    partials: &BTreeSet<String>,
) -> Vec<String> {
    let mut walk = Walk {
        problems: Vec::new(),
        partial_calls: Vec::new(),
        inline: BTreeSet::new(),
    };
    walk.template(template);
    let Walk {
        mut problems,
        partial_calls,
        inline,
        ..
    } = walk;
    for (at, name) in partial_calls {
        if !partials.contains(&name) && !inline.contains(&name) && hb.get_template(&name).is_none()
        {
            problems.push(format!("{at}{}", unknown_partial_message(&name, partials)));
        }
    }
    problems
}

struct Walk {
    problems: Vec<String>,
    /// `{{> name}}` calls, checked once inline partials are all known.
    partial_calls: Vec<(String, String)>,
    inline: BTreeSet<String>,
}

impl Walk {
    fn template(&mut self, template: &mut Template) {
        let mapping = template.mapping.clone();
        for (i, element) in template.elements.iter_mut().enumerate() {
            let at = match mapping.get(i) {
                Some(m) => format!("line {}, column {}: ", m.0, m.1),
                None => String::new(),
            };
            self.element(element, &at);
        }
    }

    fn element(&mut self, element: &mut TemplateElement, at: &str) {
        match element {
            TemplateElement::Expression(ht) | TemplateElement::HtmlExpression(ht) => {
                self.params(&ht.params, ht.hash.values(), at);
                let name = ht.name.as_name().map(str::to_owned);
                let name_only = ht.params.is_empty() && ht.hash.is_empty();
                match (&ht.name, name) {
                    // `{{field}}`: a value printed as text.
                    (Parameter::Path(path), Some(n)) if name_only && !is_helper(&n) => {
                        ht.params = vec![Parameter::Path(path.clone())];
                        ht.name = Parameter::Name(TEXT_HELPER.into());
                    }
                    (_, Some(n)) if !name_only && !is_helper(&n) => {
                        self.problems
                            .push(format!("{at}{}", unknown_helper_message(&n)));
                    }
                    // `{{lookup obj "k"}}`, `{{len items}}`...: a helper's value
                    // printed as text. Ours write text and check their input.
                    (_, Some(n)) if !name_only && !OUR_HELPERS.contains(&n.as_str()) => {
                        let call = Subexpression::new(
                            std::mem::replace(&mut ht.name, Parameter::Name(TEXT_HELPER.into())),
                            std::mem::take(&mut ht.params),
                            std::mem::take(&mut ht.hash),
                        );
                        ht.params = vec![Parameter::Subexpression(call)];
                    }
                    _ => {}
                }
            }
            TemplateElement::HelperBlock(ht) => {
                if let Some(n) = ht.name.as_name() {
                    if !is_helper(n) {
                        self.problems
                            .push(format!("{at}{}", unknown_helper_message(n)));
                    }
                }
                self.params(&ht.params, ht.hash.values(), at);
                for inner in [&mut ht.template, &mut ht.inverse].into_iter().flatten() {
                    self.template(inner);
                }
            }
            TemplateElement::PartialExpression(dt) => {
                // A computed name (`{{> (which)}}`) is only known at render time.
                if let Some(n) = dt.name.as_name() {
                    self.partial_calls.push((at.to_owned(), n.to_owned()));
                }
            }
            TemplateElement::DecoratorBlock(dt) => {
                if dt.name.as_name() == Some("inline") {
                    if let Some(Parameter::Literal(serde_json::Value::String(n))) =
                        dt.params.first()
                    {
                        self.inline.insert(n.clone());
                    }
                }
                if let Some(inner) = &mut dt.template {
                    self.template(inner);
                }
            }
            // `{{#> layout}}fallback{{/layout}}` renders its fallback when the
            // partial is missing, so only its content is checked.
            TemplateElement::PartialBlock(dt) => {
                if let Some(inner) = &mut dt.template {
                    self.template(inner);
                }
            }
            _ => {}
        }
    }

    /// Helper names used in subexpressions: `{{rub (lookup prices "x")}}`.
    fn params<'p>(
        &mut self,
        params: &'p [Parameter],
        hash: impl Iterator<Item = &'p Parameter>,
        at: &str,
    ) {
        for p in params.iter().chain(hash) {
            let Parameter::Subexpression(sub) = p else {
                continue;
            };
            let TemplateElement::Expression(ht) = sub.as_element() else {
                continue;
            };
            // A subexpression is always a helper call, even without arguments.
            if let Some(n) = ht.name.as_name() {
                if !is_helper(n) {
                    self.problems
                        .push(format!("{at}{}", unknown_helper_message(n)));
                }
            }
            self.params(&ht.params, ht.hash.values(), at);
        }
    }
}

/// Levenshtein distance over characters; names are short.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_list_is_what_handlebars_registers() {
        let hb = Handlebars::new();
        for name in BUILTIN_HELPERS {
            let err = hb
                .render_template(&format!("{{{{{name} 1}}}}"), &())
                .err()
                .map(|e| e.reason().to_string())
                .unwrap_or_default();
            assert!(!err.contains("Helper not found"), "{name}: {err}");
        }
        let err = hb.render_template("{{nosuch 1}}", &()).unwrap_err();
        assert!(err.reason().to_string().contains("Helper not found"));
    }

    #[test]
    fn a_mistyped_helper_gets_the_closest_name() {
        assert_eq!(closest_helper("rubl"), Some("rub"));
        assert_eq!(closest_helper("plurl"), Some("plural"));
        assert_eq!(closest_helper("truncat"), Some("truncate"));
        assert_eq!(closest_helper("zzzzzzzz"), None);
    }
}
