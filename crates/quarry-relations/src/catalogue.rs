//! The relation catalogue: each relation's prompt templates, used to make an edit (template 0,
//! the rewrite prompt) and to test it on paraphrases (the others).
//!
//! A relation is named by its catalogue name or one of its aliases, in any case. A relation
//! phrase that is not in the catalogue is accepted as free text when it reads as "the X of":
//! two words or more ending in "of" ("mayor of", "head of state of"); the free-text templates
//! then use the phrase without its "of" ("The mayor of {entity} is"). Other phrases are
//! refused rather than guessed at: a single unknown word is more likely a misspelt name
//! ("captial") than a relation, and a verb phrase ("written by", "located near") has no
//! noun form the templates could use. `TEMPLATE "…{entity}…"` overrides all of this.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::RelationError;

/// The placeholder each template holds exactly once.
pub const ENTITY: &str = "{entity}";

/// The key of the free-text entry, and the placeholder of its templates.
const FREE_TEXT: &str = "free_text";
const RELATION: &str = "{relation}";

#[derive(Deserialize)]
struct Entry {
    /// What people call the relation ("largest city").
    label: String,
    /// The kind of answer it takes (city, person, language, year, word…).
    answer: String,
    /// The LRE relation (Hernandez et al. 2024) its pairs come from, `fixtures/lre/<lre>.json`.
    #[serde(default)]
    lre: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    templates: Vec<String>,
    /// The template DESCRIBE asks with (measured: the best on both test models).
    #[serde(default)]
    describe: usize,
}

/// One relation of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct Relation {
    /// The catalogue name, what LQL statements use.
    pub name: &'static str,
    pub label: &'static str,
    pub answer: &'static str,
    /// The LRE relation its pairs come from, if any.
    pub lre: Option<&'static str>,
    /// Its prompt templates, each holding `{entity}` once; template 0 is the rewrite prompt of
    /// an edit.
    pub templates: &'static [String],
    /// The index of the template DESCRIBE asks with.
    pub describe: usize,
    /// Subject–object pairs of the relation (from its LRE file; empty without one), in the
    /// dataset's order: what extraction measures the model's accuracy on.
    pub pairs: &'static [Pair],
}

/// A subject and the object the relation takes it to ("France", "Paris").
pub type Pair = (String, String);

/// Every catalogue relation (not the free-text entry), sorted by name.
pub fn all() -> impl Iterator<Item = Relation> {
    catalogue()
        .iter()
        .filter(|(k, _)| *k != FREE_TEXT)
        .map(|(name, e)| Relation {
            name,
            label: &e.label,
            answer: &e.answer,
            lre: e.lre.as_deref(),
            templates: &e.templates,
            describe: e.describe,
            pairs: pairs().get(name.as_str()).map_or(&[], Vec::as_slice),
        })
}

/// The catalogue relation named `relation` or one of its aliases, in any case.
pub fn find(relation: &str) -> Option<Relation> {
    let wanted = normalise(relation);
    all().find(|r| {
        normalise(r.name) == wanted
            || catalogue()[r.name]
                .aliases
                .iter()
                .any(|a| normalise(a) == wanted)
    })
}

fn catalogue() -> &'static BTreeMap<String, Entry> {
    static CATALOGUE: OnceLock<BTreeMap<String, Entry>> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        // Embedded and checked by this crate's tests, so a parse failure is a build defect.
        serde_json::from_str(include_str!("../relations.json"))
            .expect("relations.json is valid (checked by the catalogue tests)")
    })
}

fn pairs() -> &'static BTreeMap<String, Vec<Pair>> {
    static PAIRS: OnceLock<BTreeMap<String, Vec<Pair>>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        // Written by scripts/build-relation-pairs from fixtures/lre, embedded, and checked by
        // this crate's tests.
        serde_json::from_str(include_str!("../pairs.json"))
            .expect("pairs.json is valid (checked by the catalogue tests)")
    })
}

/// The first relation (in catalogue order) one of whose pairs' objects starts with `word` as
/// its first word, in any case: what a feature that writes `word` answers, if anything
/// (" Paris" → capital, " French" → language).
pub fn answered_by(word: &str) -> Option<Relation> {
    static FIRST_WORDS: OnceLock<BTreeMap<String, &'static str>> = OnceLock::new();
    let words = FIRST_WORDS.get_or_init(|| {
        let mut words = BTreeMap::new();
        for r in all() {
            for (_, object) in r.pairs {
                if let Some(first) = object.split_whitespace().next() {
                    words.entry(first.to_lowercase()).or_insert(r.name);
                }
            }
        }
        words
    });
    let name = words.get(&word.trim().to_lowercase())?;
    all().find(|r| r.name == *name)
}

/// The catalogue's relation names (not the free-text entry), sorted.
pub fn relations() -> Vec<&'static str> {
    all().map(|r| r.name).collect()
}

/// The templates for `relation`: `template` alone when given (it must hold `{entity}` exactly
/// once), else the relation's catalogue templates, else the free-text templates for a phrase
/// ending in "of" (see the module documentation). Template 0 is the rewrite prompt.
pub fn templates(relation: &str, template: Option<&str>) -> Result<Vec<String>, RelationError> {
    if let Some(t) = template {
        if t.matches(ENTITY).count() != 1 {
            return Err(RelationError::BadTemplate {
                template: t.to_string(),
            });
        }
        return Ok(vec![t.to_string()]);
    }
    if let Some(r) = find(relation) {
        return Ok(r.templates.to_vec());
    }
    let wanted = normalise(relation);
    let words: Vec<&str> = wanted.split(' ').collect();
    let phrase_ok = words.len() >= 2
        && words.last() == Some(&"of")
        && relation
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '\''));
    if !phrase_ok {
        return Err(RelationError::UnknownRelation {
            relation: relation.to_string(),
            known: format!(
                "known: {}, their aliases, or a phrase ending in \"of\" such as \"mayor of\"",
                relations().join(", ")
            ),
        });
    }
    let noun = words[..words.len() - 1].join(" ");
    Ok(catalogue()[FREE_TEXT]
        .templates
        .iter()
        .map(|t| t.replace(RELATION, &noun))
        .collect())
}

/// `template` with `entity` in place of `{entity}`.
pub fn fill(template: &str, entity: &str) -> String {
    template.replacen(ENTITY, entity, 1)
}

/// Lower case, words separated by single spaces.
fn normalise(s: &str) -> String {
    s.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_holds_the_entity_once_and_the_issue_relations_are_there() {
        for (name, entry) in catalogue() {
            assert!(!entry.templates.is_empty(), "{name}");
            assert!(entry.describe < entry.templates.len(), "{name}");
            assert!(
                !entry.label.is_empty() && !entry.answer.is_empty(),
                "{name}"
            );
            for t in &entry.templates {
                assert_eq!(t.matches(ENTITY).count(), 1, "{name}: {t}");
                assert_eq!(
                    t.matches(RELATION).count(),
                    usize::from(name == FREE_TEXT),
                    "{name}: {t}"
                );
            }
        }
        for r in [
            "capital",
            "language",
            "currency",
            "country",
            "continent",
            "opposite",
        ] {
            assert!(relations().contains(&r), "{r}");
        }
        // Enough relations for DESCRIBE to say something about places, people, things and
        // words.
        assert!(relations().len() >= 20, "{}", relations().len());
    }

    /// The pairs are those of the relation's LRE file, and only a relation with one has them.
    #[test]
    fn relations_with_an_lre_file_have_its_pairs() {
        for name in pairs().keys() {
            assert!(find(name).is_some_and(|r| r.lre.is_some()), "{name}");
        }
        for r in all() {
            assert_eq!(r.lre.is_some(), !r.pairs.is_empty(), "{}", r.name);
            assert!(r.pairs.len() <= 60, "{}", r.name);
            for (s, o) in r.pairs {
                assert!(!s.trim().is_empty() && !o.trim().is_empty(), "{}", r.name);
                assert!(!o.contains("\\u"), "{}: {o} is still escaped", r.name);
            }
        }
        let capital = find("capital").unwrap().pairs;
        assert!(capital.iter().any(|(s, o)| s == "France" && o == "Paris"));
        assert!(capital
            .iter()
            .any(|(s, o)| s == "Brazil" && o == "Bras\u{ed}lia"));
    }

    #[test]
    fn a_word_is_answered_by_the_first_relation_with_it_as_an_object() {
        assert_eq!(answered_by(" Paris").map(|r| r.name), Some("capital"));
        assert_eq!(answered_by("french").map(|r| r.name), Some("language"));
        assert!(answered_by(" strugg").is_none());
        assert!(answered_by("").is_none());
    }

    #[test]
    fn names_and_aliases_in_any_case_give_the_catalogue_templates() {
        let capital = templates("capital", None).unwrap();
        assert_eq!(capital[0], "The capital of {entity} is the city of");
        assert_eq!(templates("  Capital   OF ", None).unwrap(), capital);
        assert_eq!(
            templates("written by", None).unwrap(),
            templates("author", None).unwrap()
        );
    }

    #[test]
    fn a_phrase_ending_in_of_uses_the_free_text_templates() {
        let t = templates("Mayor of", None).unwrap();
        assert_eq!(t[0], "The mayor of {entity} is");
        assert!(t.iter().all(|t| !t.contains(RELATION)));
        assert_eq!(
            fill(&templates("head of state of", None).unwrap()[0], "Peru"),
            "The head of state of Peru is"
        );
    }

    #[test]
    fn anything_else_is_refused_naming_the_known_relations() {
        for bad in ["captial", "located near", "of", "", "boss {entity} of"] {
            let e = templates(bad, None).unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(e, RelationError::UnknownRelation { .. }),
                "{bad}: {e}"
            );
            assert!(text.contains("birth year, capital, category"), "{text}");
            assert!(text.contains("TEMPLATE"), "{text}");
        }
    }

    #[test]
    fn a_template_overrides_and_must_hold_the_entity_once() {
        assert_eq!(
            templates("anything at all", Some("{entity} is run by")).unwrap(),
            vec!["{entity} is run by".to_string()]
        );
        for bad in ["no entity", "{entity} and {entity}"] {
            assert!(matches!(
                templates("capital", Some(bad)),
                Err(RelationError::BadTemplate { .. })
            ));
        }
    }
}
