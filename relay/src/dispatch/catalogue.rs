//! The event types the dispatcher knows: the built-in catalogue, the
//! operator's (`--event-type`), and those an account added through the API.

use ferry_common::api::EventTypeView;

use crate::store::EventTypeRecord;

/// A built-in type: name, description, example payload (JSON).
const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "document.field.update",
        "A field inside a document, component or asset was updated.",
        r#"{"document_id":"doc_123","field":"title","old_value":"Draft title","new_value":"Final title","updated_by":"usr_42"}"#,
    ),
    (
        "document.create",
        "A document was created.",
        r#"{"document_id":"doc_123","blueprint_id":"bp_7","title":"Launch notes","created_by":"usr_42"}"#,
    ),
    (
        "document.update",
        "A document's status changed (draft, published …); not field updates.",
        r#"{"document_id":"doc_123","old_status":"draft","new_status":"published","updated_by":"usr_42"}"#,
    ),
    (
        "document.delete",
        "A document was deleted.",
        r#"{"document_id":"doc_123","deleted_by":"usr_42"}"#,
    ),
    (
        "blueprint.create",
        "A blueprint was created.",
        r#"{"blueprint_id":"bp_7","name":"Article","created_by":"usr_42"}"#,
    ),
    (
        "blueprint.update",
        "A blueprint was changed.",
        r#"{"blueprint_id":"bp_7","name":"Article","changed_fields":["name"],"updated_by":"usr_42"}"#,
    ),
    (
        "blueprint.delete",
        "A blueprint was deleted.",
        r#"{"blueprint_id":"bp_7","deleted_by":"usr_42"}"#,
    ),
    (
        "project.member.assign",
        "A member was assigned to a project, or a member's role changed.",
        r#"{"project_id":"prj_3","member_id":"usr_77","role":"editor","assigned_by":"usr_42"}"#,
    ),
    (
        "project.member.deassign",
        "A member was removed from a project.",
        r#"{"project_id":"prj_3","member_id":"usr_77","removed_by":"usr_42"}"#,
    ),
];

/// The longest event type name.
const MAX_NAME: usize = 128;

/// Checks an event type's name: dot-separated words of lowercase letters,
/// digits, `_` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let word_ok = |word: &str| {
        !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    if name.len() > MAX_NAME || !name.split('.').all(word_ok) {
        return Err(format!(
            "`{}` is not an event type name: use dot-separated lowercase words such as invoice.paid (at most {MAX_NAME} characters)",
            name.chars().take(MAX_NAME).collect::<String>()
        ));
    }
    Ok(())
}

/// The types known to everyone: built in, and the operator's.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// `--event-type NAME=DESCRIPTION`.
    operator: Vec<(String, String)>,
}

impl Catalogue {
    /// The built-in catalogue and `operator`'s additions.
    pub fn new(operator: Vec<(String, String)>) -> Self {
        Self { operator }
    }

    /// Every type `added` (from the store) and the catalogue hold, by name;
    /// a name given twice keeps its first description.
    pub fn all(&self, added: &[EventTypeRecord]) -> Vec<EventTypeView> {
        let mut all: Vec<EventTypeView> = BUILTIN
            .iter()
            .map(|(name, description, example)| EventTypeView {
                name: (*name).to_owned(),
                description: (*description).to_owned(),
                example: serde_json::from_str(example).unwrap_or_default(),
                source: "builtin".to_owned(),
            })
            .collect();
        for (name, description) in &self.operator {
            all.push(EventTypeView {
                name: name.clone(),
                description: description.clone(),
                example: serde_json::json!({}),
                source: "operator".to_owned(),
            });
        }
        for record in added {
            all.push(EventTypeView {
                name: record.name.clone(),
                description: record.description.clone(),
                example: serde_json::from_str(&record.example).unwrap_or_default(),
                source: if record.owner.is_empty() {
                    "operator"
                } else {
                    "account"
                }
                .to_owned(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        all.retain(|t| seen.insert(t.name.clone()));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// Checks `actions` against the known `types`: each a known name, `*`, or
/// `group.*` for a group some known name is in.
pub fn check_actions(actions: &[String], types: &[EventTypeView]) -> Result<(), String> {
    if actions.is_empty() {
        return Err(known("`actions` lists no event type", types));
    }
    for action in actions {
        let known_type = action == "*"
            || types.iter().any(|t| &t.name == action)
            || action.strip_suffix(".*").is_some_and(|group| {
                types.iter().any(|t| {
                    t.name
                        .strip_prefix(group)
                        .is_some_and(|r| r.starts_with('.'))
                })
            });
        if !known_type {
            return Err(known(
                &format!(
                    "`{}` is not a known event type",
                    action.chars().take(MAX_NAME).collect::<String>()
                ),
                types,
            ));
        }
    }
    Ok(())
}

/// `message`, then the known types and wildcards.
pub fn known(message: &str, types: &[EventTypeView]) -> String {
    let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
    format!(
        "{message}; known types: {} (or `*`, or a group such as `document.*`)",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::{check_actions, check_name, Catalogue};

    #[test]
    fn actions_are_checked_against_the_catalogue_with_wildcards() {
        let types = Catalogue::default().all(&[]);
        let ok = |a: &[&str]| {
            check_actions(
                &a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                &types,
            )
        };
        assert!(ok(&["document.create", "project.member.*"]).is_ok());
        assert!(ok(&["*"]).is_ok());
        assert!(ok(&["document.*"]).is_ok());
        let err = ok(&["document.created"]).expect_err("unknown");
        assert!(err.contains("document.create,"), "{err}");
        assert!(ok(&["doc.*"]).is_err());
        assert!(ok(&[]).is_err());
    }

    #[test]
    fn names_are_dotted_lowercase_words() {
        assert!(check_name("invoice.paid").is_ok());
        assert!(check_name("Invoice").is_err());
        assert!(check_name("a..b").is_err());
        assert!(check_name("").is_err());
    }
}
