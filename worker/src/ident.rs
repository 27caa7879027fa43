//! Names that end up in SQL text or in Pub/Sub requests.
//!
//! Table names cannot be bound as query parameters, so they are validated here,
//! once, before any SQL is built from them; everything else is a bind parameter.

use std::fmt;
use std::str::FromStr;

/// Why a name was refused; the message names the rule that failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "invalid table name {0:?}: expected an SQL identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters), optionally schema-qualified as schema.table"
    )]
    Table(String),
    #[error(
        "invalid topic {0:?}: expected projects/PROJECT/topics/TOPIC (a topic id of 3-255 characters starting with a letter, not with \"goog\")"
    )]
    Topic(String),
    #[error(
        "invalid subscription {0:?}: expected projects/PROJECT/subscriptions/SUBSCRIPTION (an id of 3-255 characters starting with a letter, not with \"goog\")"
    )]
    Subscription(String),
}

/// A validated, optionally schema-qualified table name.
///
/// Only unquoted-identifier characters are accepted, and the SQL form is always
/// double-quoted, so a name can neither inject SQL nor change case silently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

impl TableName {
    /// The table's name without schema (used to derive sibling objects).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, when the name was qualified.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The quoted SQL form, e.g. `"app"."outbox"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// A sibling table in the same schema whose name is this one plus `suffix`
    /// (e.g. the dead-letter table `outbox_dead_letter`).
    pub fn with_suffix(&self, suffix: &str) -> Result<TableName, NameError> {
        let name = format!("{}{suffix}", self.name);
        if !is_identifier(&name) {
            return Err(NameError::Table(name));
        }
        Ok(TableName {
            schema: self.schema.clone(),
            name,
        })
    }
}

impl FromStr for TableName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NameError::Table(s.to_owned());
        match s.split_once('.') {
            Some((schema, name)) if is_identifier(schema) && is_identifier(name) => Ok(TableName {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            }),
            Some(_) => Err(err()),
            None if is_identifier(s) => Ok(TableName {
                schema: None,
                name: s.to_owned(),
            }),
            None => Err(err()),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Pub/Sub's rule for topic and subscription ids.
fn is_resource_id(s: &str) -> bool {
    let mut chars = s.chars();
    (3..=255).contains(&s.len())
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c))
        && !s.to_ascii_lowercase().starts_with("goog")
}

/// Project ids: 6-30 lowercase letters, digits or hyphens, starting with a letter.
/// The emulator accepts any non-empty id, so only the character set is enforced.
fn is_project_id(s: &str) -> bool {
    let mut chars = s.chars();
    (1..=30).contains(&s.len())
        && matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn parse_full(s: &str, collection: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix("projects/")?;
    let (project, rest) = rest.split_once('/')?;
    let id = rest.strip_prefix(collection)?.strip_prefix('/')?;
    (is_project_id(project) && is_resource_id(id)).then(|| (project.to_owned(), id.to_owned()))
}

/// A full topic name, `projects/P/topics/T`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    project: String,
    id: String,
}

impl TopicName {
    /// Resolves a row's `topic` column: a full name, or a short id in this
    /// topic's project.
    pub fn resolve(&self, routed: &str) -> Result<TopicName, NameError> {
        if routed.starts_with("projects/") {
            routed.parse()
        } else if is_resource_id(routed) {
            Ok(TopicName {
                project: self.project.clone(),
                id: routed.to_owned(),
            })
        } else {
            Err(NameError::Topic(routed.to_owned()))
        }
    }

    /// The project the topic lives in.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The short topic id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl FromStr for TopicName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_full(s, "topics")
            .map(|(project, id)| TopicName { project, id })
            .ok_or_else(|| NameError::Topic(s.to_owned()))
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "projects/{}/topics/{}", self.project, self.id)
    }
}

/// A full subscription name, `projects/P/subscriptions/S`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionName {
    project: String,
    id: String,
}

impl FromStr for SubscriptionName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_full(s, "subscriptions")
            .map(|(project, id)| SubscriptionName { project, id })
            .ok_or_else(|| NameError::Subscription(s.to_owned()))
    }
}

impl fmt::Display for SubscriptionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "projects/{}/subscriptions/{}", self.project, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        let t: TableName = "outbox".parse().unwrap();
        assert_eq!(t.quoted(), "\"outbox\"");
        let t: TableName = "app.Events_1".parse().unwrap();
        assert_eq!(t.quoted(), "\"app\".\"Events_1\"");
        assert_eq!(t.to_string(), "app.Events_1");
        assert_eq!(
            t.with_suffix("_dead_letter").unwrap().quoted(),
            "\"app\".\"Events_1_dead_letter\""
        );
        for bad in [
            "",
            "1abc",
            "a-b",
            "a.b.c",
            "outbox; DROP TABLE x",
            "\"outbox\"",
            ".outbox",
            "outbox.",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?} accepted");
        }
        let long: TableName = "x".repeat(60).parse().unwrap();
        assert!(long.with_suffix("_dead_letter").is_err());
    }

    #[test]
    fn topic_names() {
        let t: TopicName = "projects/my-proj/topics/orders.v1".parse().unwrap();
        assert_eq!(t.project(), "my-proj");
        assert_eq!(t.id(), "orders.v1");
        assert_eq!(t.to_string(), "projects/my-proj/topics/orders.v1");
        assert_eq!(
            t.resolve("other").unwrap().to_string(),
            "projects/my-proj/topics/other"
        );
        assert_eq!(
            t.resolve("projects/x-1/topics/abc").unwrap().to_string(),
            "projects/x-1/topics/abc"
        );
        for bad in [
            "orders",
            "projects/p/topics/ab",
            "projects/p/topics/goog-x",
            "projects/P/topics/abc",
            "projects/p/subscriptions/abc",
            "projects//topics/abc",
            "projects/p/topics/abc/extra",
            "projects/p/topics/1abc",
        ] {
            assert!(bad.parse::<TopicName>().is_err(), "{bad:?} accepted");
        }
        assert!(t.resolve("a b").is_err());
        assert!(t.resolve("").is_err());
    }

    #[test]
    fn subscription_names() {
        let s: SubscriptionName = "projects/p1/subscriptions/sub".parse().unwrap();
        assert_eq!(s.to_string(), "projects/p1/subscriptions/sub");
        assert!(
            "projects/p1/topics/sub"
                .parse::<SubscriptionName>()
                .is_err()
        );
    }
}
