//! Topic templates: which levels of a message's topic become tags, and which names the
//! table. `plant/{site}/{line}/{machine}` makes `plant/north/3/press-4` the tags
//! site=north, line=3, machine=press-4; `{table}` names the table instead of a tag; `+`
//! skips a level and a final `#` any number of them. A literal level must match as written.

use crate::line_protocol::RowContext;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Tag(String),
    Table,
    Any,
    Rest,
}

/// A parsed `topic_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    levels: Vec<Level>,
}

impl std::str::FromStr for TopicTemplate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| format!("topic template {text:?}: {why}");
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::Any,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(fail("'#' must be the last level")),
                "{table}" => Level::Table,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if name.contains(['{', '}']) {
                        return Err(fail(&format!("{p:?} is not a level name")));
                    }
                    Level::Tag(name.to_string())
                }
                p if p.contains(['{', '}', '+', '#']) => {
                    return Err(fail(&format!(
                        "level {p:?}: a name in braces must be the whole level"
                    )));
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        let mut names: Vec<&str> = levels
            .iter()
            .filter_map(|l| match l {
                Level::Tag(n) => Some(n.as_str()),
                Level::Table => Some("{table}"),
                _ => None,
            })
            .collect();
        if names.is_empty() {
            return Err(fail("names no level ({tag} or {table})"));
        }
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(fail(&format!("{} is named twice", w[0])));
        }
        Ok(Self {
            text: text.to_string(),
            levels,
        })
    }
}

impl TopicTemplate {
    /// The table and tags `topic` gives, or why it does not fit the template.
    pub fn apply(&self, topic: &str) -> Result<RowContext, String> {
        let mut context = RowContext::default();
        let mut topic_levels = topic.split('/');
        let misfit = || {
            format!(
                "topic {topic:?} does not fit the topic template {:?}",
                self.text
            )
        };
        for level in &self.levels {
            if *level == Level::Rest {
                return Ok(context);
            }
            let value = topic_levels.next().ok_or_else(misfit)?;
            match level {
                Level::Literal(l) if l != value => return Err(misfit()),
                Level::Literal(_) | Level::Any | Level::Rest => {}
                Level::Tag(name) if value.is_empty() => {
                    return Err(format!(
                        "topic {topic:?}: the level of tag {name:?} is empty"
                    ));
                }
                Level::Tag(name) => context.tags.push((name.clone(), value.to_string())),
                Level::Table if value.is_empty() => {
                    return Err(format!("topic {topic:?}: the table level is empty"));
                }
                Level::Table => context.table = Some(value.to_string()),
            }
        }
        match topic_levels.next() {
            None => Ok(context),
            Some(_) => Err(misfit()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_become_tags_and_the_table() {
        let t: TopicTemplate = "plant/{site}/{line}/{machine}".parse().unwrap();
        let c = t.apply("plant/north/3/press-4").unwrap();
        assert_eq!(c.table, None);
        assert_eq!(
            c.tags,
            [("site", "north"), ("line", "3"), ("machine", "press-4")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let e = t.apply("plant/north/3").unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        assert!(t.apply("plant/north/3/press-4/extra").is_err());
        assert!(t.apply("mill/north/3/press-4").is_err());
        let e = t.apply("plant/north//press-4").unwrap_err();
        assert!(e.contains("tag \"line\" is empty"), "{e}");

        let t: TopicTemplate = "+/{table}/{device}/#".parse().unwrap();
        let c = t.apply("site/boilers/b1/x/y").unwrap();
        assert_eq!(c.table.as_deref(), Some("boilers"));
        assert_eq!(c.tags, [("device".to_string(), "b1".to_string())]);
    }

    #[test]
    fn bad_templates_say_why() {
        for (text, why) in [
            ("plant/#/x", "'#' must be the last level"),
            ("plant/{a}b", "must be the whole level"),
            ("plant/{a}/{a}", "a is named twice"),
            ("plant/+", "names no level"),
        ] {
            let e = text.parse::<TopicTemplate>().unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
