//! ACL policies and tokens. A policy is a list of rules "resource kind + name prefix → access";
//! the longest matching prefix decides, and anything unmatched is denied.

use serde::{Deserialize, Serialize};

use crate::validate::{self, ValidationError};

pub const GLOBAL_MANAGEMENT: &str = "global-management";
pub const MAX_RULES: usize = 256;
pub const MAX_POLICIES_PER_TOKEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Service,
    Kv,
    Acl,
    Operator,
    /// Gateway routes.
    Route,
    /// Gateway consumers (callers with API keys and scopes).
    Consumer,
    /// Consul nodes by name: node listings, node lookups in the catalog and DNS (Consul's
    /// `node_prefix` rules).
    Node,
    /// Event streams by name. System and derived streams (`$registry`, `$all`, `$ce-order`)
    /// need a rule whose prefix starts with `$`: a rule for every name ("") does not reach them.
    Stream,
    /// Persistent subscriptions (consumer groups, webhooks) by name.
    Subscription,
    /// Distributed transactions by gid (the DTM API and `/api/v1/transactions`).
    Transaction,
    /// Service reports by service name: write to report for an instance of the service, read
    /// to list a service's reports.
    Report,
    /// Plans (maintenance windows, rollouts, config changes) by plan name.
    Plan,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Kv => "kv",
            Self::Acl => "acl",
            Self::Operator => "operator",
            Self::Route => "route",
            Self::Consumer => "consumer",
            Self::Node => "node",
            Self::Stream => "stream",
            Self::Subscription => "subscription",
            Self::Transaction => "transaction",
            Self::Report => "report",
            Self::Plan => "plan",
        }
    }
}

/// Access levels are ordered: write implies read; deny beats nothing (it is an explicit "no").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Deny,
    Read,
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub resource: Resource,
    /// Name prefix the rule covers; "" covers every name.
    #[serde(default)]
    pub prefix: String,
    pub access: Access,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub rules: Vec<Rule>,
}

impl PolicySpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::name("name", &self.name)?;
        validate::text("description", &self.description)?;
        if self.rules.len() > MAX_RULES {
            return Err(ValidationError::new("rules", format!("at most {MAX_RULES} rules")));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.prefix.len() > validate::MAX_KV_KEY_LEN {
                return Err(ValidationError::new(format!("rules[{i}].prefix"), "too long"));
            }
        }
        Ok(())
    }
}

/// A token as stored. `secret_id` is the bearer credential; `accessor_id` names it publicly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Token {
    pub accessor_id: String,
    pub secret_id: String,
    pub description: String,
    pub policies: Vec<String>,
    pub create_index: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub policies: Vec<String>,
}

impl TokenSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::text("description", &self.description)?;
        if self.policies.len() > MAX_POLICIES_PER_TOKEN {
            return Err(ValidationError::new("policies", format!("at most {MAX_POLICIES_PER_TOKEN} policies")));
        }
        for (i, p) in self.policies.iter().enumerate() {
            validate::name(&format!("policies[{i}]"), p)?;
        }
        Ok(())
    }
}

/// The effective rules of one caller, merged from all its policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authority {
    rules: Vec<Rule>,
    management: bool,
}

impl Authority {
    pub fn management() -> Self {
        Self { rules: vec![], management: true }
    }

    pub fn from_rules(rules: impl IntoIterator<Item = Rule>) -> Self {
        Self { rules: rules.into_iter().collect(), management: false }
    }

    pub fn is_management(&self) -> bool {
        self.management
    }

    /// Longest prefix wins; among equally long prefixes, deny wins over any grant. Names
    /// starting with `$` are reached only by rules whose prefix starts with `$` (stream names).
    pub fn allows(&self, resource: Resource, name: &str, need: Access) -> bool {
        if self.management {
            return true;
        }
        let reserved = resource == Resource::Stream && name.starts_with('$');
        let mut best: Option<(usize, Access)> = None;
        for r in self.rules.iter().filter(|r| r.resource == resource && name.starts_with(r.prefix.as_str()) && (!reserved || r.prefix.starts_with('$'))) {
            let len = r.prefix.len();
            best = match best {
                Some((l, _)) if l > len => best,
                Some((l, a)) if l == len => Some((l, if a == Access::Deny || r.access == Access::Deny { Access::Deny } else { a.max(r.access) })),
                _ => Some((len, r.access)),
            };
        }
        match best {
            Some((_, Access::Deny)) | None => false,
            Some((_, have)) => have >= need,
        }
    }

    /// Whether `need` is allowed on every name that starts with `prefix` (a recursive delete, a
    /// tree read that must not be filtered). The names under `prefix` are decided by the rules
    /// that match `prefix` itself plus the longer rules inside it, so it is enough that the
    /// prefix is allowed and so is the prefix of every rule inside it.
    pub fn allows_all_under(&self, resource: Resource, prefix: &str, need: Access) -> bool {
        if self.management {
            return true;
        }
        self.allows(resource, prefix, need)
            && self
                .rules
                .iter()
                .filter(|r| r.resource == resource && r.prefix.len() > prefix.len() && r.prefix.starts_with(prefix))
                // The decision at each inner rule's prefix, not the rule alone: several policies
                // may name the same prefix, and their merge is what applies.
                .all(|r| self.allows(resource, &r.prefix, need))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(resource: Resource, prefix: &str, access: Access) -> Rule {
        Rule { resource, prefix: prefix.into(), access }
    }

    #[test]
    fn longest_prefix_wins_and_default_denies() {
        let a = Authority::from_rules([
            rule(Resource::Kv, "", Access::Read),
            rule(Resource::Kv, "app/", Access::Write),
            rule(Resource::Kv, "app/secret", Access::Deny),
        ]);
        assert!(a.allows(Resource::Kv, "other", Access::Read));
        assert!(!a.allows(Resource::Kv, "other", Access::Write));
        assert!(a.allows(Resource::Kv, "app/x", Access::Write));
        assert!(!a.allows(Resource::Kv, "app/secret/1", Access::Read));
        assert!(!a.allows(Resource::Service, "web", Access::Read));
        assert!(Authority::management().allows(Resource::Acl, "", Access::Write));
        assert!(!Authority::default().allows(Resource::Kv, "x", Access::Read));
    }

    #[test]
    fn all_under_a_prefix_sees_the_rules_inside_it() {
        let a = Authority::from_rules([rule(Resource::Kv, "app/", Access::Write), rule(Resource::Kv, "app/secret/", Access::Deny)]);
        assert!(a.allows(Resource::Kv, "app/", Access::Write));
        assert!(!a.allows_all_under(Resource::Kv, "app/", Access::Write), "a deny inside the prefix");
        assert!(!a.allows_all_under(Resource::Kv, "app", Access::Read));
        assert!(!a.allows_all_under(Resource::Kv, "", Access::Write));
        assert!(a.allows_all_under(Resource::Kv, "app/public/", Access::Write));
        assert!(!a.allows_all_under(Resource::Kv, "app/secret/x", Access::Read));
        let r = Authority::from_rules([rule(Resource::Kv, "", Access::Write), rule(Resource::Kv, "ro/", Access::Read)]);
        assert!(r.allows_all_under(Resource::Kv, "", Access::Read));
        assert!(!r.allows_all_under(Resource::Kv, "", Access::Write), "a read-only rule inside");
        assert!(Authority::management().allows_all_under(Resource::Kv, "", Access::Write));
        // Two policies naming one prefix merge (the greater grant applies), inside a tree too.
        let merged =
            Authority::from_rules([rule(Resource::Kv, "", Access::Write), rule(Resource::Kv, "b", Access::Write), rule(Resource::Kv, "b", Access::Read)]);
        assert!(merged.allows_all_under(Resource::Kv, "", Access::Write));
    }

    #[test]
    fn system_streams_need_a_grant_of_their_own() {
        let everything = Authority::from_rules([rule(Resource::Stream, "", Access::Write)]);
        assert!(everything.allows(Resource::Stream, "order-1", Access::Write));
        assert!(!everything.allows(Resource::Stream, "$registry", Access::Read), "\"\" does not reach system streams");
        let system = Authority::from_rules([rule(Resource::Stream, "$registry", Access::Read)]);
        assert!(system.allows(Resource::Stream, "$registry", Access::Read));
        assert!(!system.allows(Resource::Stream, "$audit", Access::Read));
        assert!(Authority::management().allows(Resource::Stream, "$all", Access::Read));
    }

    proptest::proptest! {
        /// Against the definition: "allowed for every name under the prefix" is checked on
        /// names built from the rules' own prefixes (the only places the answer can change).
        #[test]
        fn all_under_agrees_with_every_name(rules in proptest::collection::vec(("[ab]{0,3}", 0u8..3), 0..6), prefix in "[ab]{0,2}", need in 1u8..3) {
            let access = |n: u8| [Access::Deny, Access::Read, Access::Write][n as usize];
            let a = Authority::from_rules(rules.iter().map(|(p, n)| rule(Resource::Kv, p, access(*n))));
            let need = access(need);
            let mut names: Vec<String> = rules.iter().map(|(p, _)| p.clone()).filter(|p| p.starts_with(&prefix)).collect();
            names.push(prefix.clone());
            names.extend(names.clone().into_iter().flat_map(|n| [format!("{n}a"), format!("{n}b"), format!("{n}z")]));
            let every = names.iter().filter(|n| n.starts_with(&prefix)).all(|n| a.allows(Resource::Kv, n, need));
            proptest::prop_assert_eq!(a.allows_all_under(Resource::Kv, &prefix, need), every);
        }
    }
}
