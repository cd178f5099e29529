//! Summary and description templates: `{{ $labels.NAME }}` is the alert's label NAME
//! (empty if it has none) and `{{ $value }}` the value that caused the transition;
//! `{{ labels.NAME }}` and `{{ value }}` are the same.

use std::collections::BTreeMap;

enum Part<'a> {
    Text(&'a str),
    Label(&'a str),
    Value,
}

fn parse(text: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        parts.push(Part::Text(&rest[..start]));
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!("unclosed {{{{ at {:?}", &rest[start..]));
        };
        let inner = after[..end].trim();
        let inner = inner.strip_prefix('$').unwrap_or(inner);
        parts.push(if inner == "value" {
            Part::Value
        } else if let Some(name) = inner.strip_prefix("labels.").filter(|n| !n.is_empty()) {
            Part::Label(name)
        } else {
            return Err(format!(
                "unknown placeholder {{{{ {} }}}}: use {{{{ $labels.NAME }}}} or {{{{ $value }}}}",
                after[..end].trim()
            ));
        });
        rest = &after[end + 2..];
    }
    parts.push(Part::Text(rest));
    Ok(parts)
}

/// Checks that `text` is a valid template.
pub fn check(text: &str) -> Result<(), String> {
    parse(text).map(drop)
}

/// `text` with its placeholders replaced (an invalid template is returned as it is).
pub fn render(text: &str, labels: &BTreeMap<String, String>, value: Option<f64>) -> String {
    let Ok(parts) = parse(text) else {
        return text.to_owned();
    };
    let mut out = String::with_capacity(text.len());
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Label(name) => out.push_str(labels.get(name).map_or("", String::as_str)),
            Part::Value => match value {
                Some(v) => out.push_str(&v.to_string()),
                None => out.push_str("NULL"),
            },
        }
    }
    out
}
