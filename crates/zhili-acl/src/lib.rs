//! Access control: tokens and policies kept in the [`Store`], served from an in-memory snapshot
//! that readers load without locking. Secrets are looked up by their SHA-256 and then compared in
//! constant time, so response timing says nothing about how close a guess was.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zhili_model::acl::{Authority, PolicySpec, Rule, Token, TokenSpec, GLOBAL_MANAGEMENT};
use zhili_model::ValidationError;
use zhili_store::{Compare, Op, Store, StoreError, Txn};

const TOKENS: &str = "acl/tokens/";
const POLICIES: &str = "acl/policies/";
const BOOTSTRAP: &str = "acl/bootstrap";
/// The secret DNS answers with (Consul's agent DNS token), when set through the API.
const DNS_TOKEN: &str = "acl/agent-tokens/dns";

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("ACL token not found")]
    TokenNotFound,
    #[error("ACL bootstrap already done; use the management token it returned")]
    AlreadyBootstrapped,
    #[error("policy {0:?} not found")]
    PolicyNotFound(String),
    #[error("policy {0:?} is built in and cannot be changed")]
    BuiltIn(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored ACL record {0:?} is corrupt")]
    Corrupt(String),
}

#[derive(Default)]
struct Snapshot {
    by_secret_hash: HashMap<[u8; 32], Token>,
    tokens: HashMap<String, Token>,
    policies: HashMap<String, PolicySpec>,
}

pub struct Acl {
    store: Arc<dyn Store>,
    enabled: bool,
    snapshot: ArcSwap<Snapshot>,
    /// Serializes write + reload so a slow reload can never publish an older snapshot.
    writes: tokio::sync::Mutex<()>,
    /// Bumped after every reload: open streams and blocking reads re-resolve their token on it,
    /// so a deleted token or a narrowed policy takes effect on them too.
    generation: tokio::sync::watch::Sender<u64>,
    /// The secret whose rights DNS answers with; None: anonymous.
    dns_token: arc_swap::ArcSwapOption<String>,
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_uuid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

impl Acl {
    /// `enabled = false` is dev mode: every caller is treated as management.
    pub fn load(store: Arc<dyn Store>, enabled: bool) -> Result<Arc<Self>, AclError> {
        let acl = Arc::new(Self {
            store,
            enabled,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            writes: tokio::sync::Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(0),
            dns_token: arc_swap::ArcSwapOption::empty(),
        });
        acl.reload()?;
        if let Some(kv) = acl.store.get(DNS_TOKEN)? {
            let secret = String::from_utf8(kv.value.to_vec()).map_err(|_| AclError::Corrupt(DNS_TOKEN.into()))?;
            acl.dns_token.store(Some(Arc::new(secret)));
        }
        Ok(acl)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn bootstrapped(&self) -> Result<bool, AclError> {
        Ok(self.store.get(BOOTSTRAP)?.is_some())
    }

    fn reload(&self) -> Result<(), AclError> {
        let mut snap = Snapshot::default();
        for kv in self.store.range(TOKENS, None)? {
            let mut t: Token = serde_json::from_slice(&kv.value).map_err(|_| AclError::Corrupt(kv.key.clone()))?;
            t.create_index = kv.create_revision;
            snap.by_secret_hash.insert(hash(&t.secret_id), t.clone());
            snap.tokens.insert(t.accessor_id.clone(), t);
        }
        for kv in self.store.range(POLICIES, None)? {
            let p: PolicySpec = serde_json::from_slice(&kv.value).map_err(|_| AclError::Corrupt(kv.key.clone()))?;
            snap.policies.insert(p.name.clone(), p);
        }
        self.snapshot.store(Arc::new(snap));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Changes whenever tokens or policies change. Subscribe before resolving a token, so no
    /// change can fall between the two.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Resolves when `secret` no longer resolves to `granted` (deleted token, changed policy).
    /// `changes` must come from [`Self::changes`] taken before `granted` was resolved.
    pub async fn revoked(&self, mut changes: tokio::sync::watch::Receiver<u64>, secret: &str, granted: &Authority) {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.resolve(Some(secret)).ok().as_ref() != Some(granted) {
                return;
            }
        }
    }

    /// Resolves a presented secret to what it may do. No secret means anonymous (denied everything
    /// while ACLs are on); an unknown secret is an error so typos are loud.
    pub fn resolve(&self, secret: Option<&str>) -> Result<Authority, AclError> {
        if !self.enabled {
            return Ok(Authority::management());
        }
        let Some(secret) = secret.filter(|s| !s.is_empty()) else { return Ok(Authority::default()) };
        let snap = self.snapshot.load();
        let token = snap.by_secret_hash.get(&hash(secret)).ok_or(AclError::TokenNotFound)?;
        if !bool::from(token.secret_id.as_bytes().ct_eq(secret.as_bytes())) {
            return Err(AclError::TokenNotFound);
        }
        if token.policies.iter().any(|p| p == GLOBAL_MANAGEMENT) {
            return Ok(Authority::management());
        }
        let rules: Vec<Rule> = token.policies.iter().filter_map(|p| snap.policies.get(p)).flat_map(|p| p.rules.iter().cloned()).collect();
        Ok(Authority::from_rules(rules))
    }

    /// The secret DNS answers with (None: anonymous rights).
    pub fn dns_token(&self) -> Option<Arc<String>> {
        self.dns_token.load_full()
    }

    /// Sets the DNS token for this run only (the `--dns-token` flag); wins over a stored one.
    pub fn use_dns_token(&self, secret: Option<String>) {
        if let Some(secret) = secret {
            self.dns_token.store(Some(Arc::new(secret)));
        }
    }

    /// Sets (or, with None or "", clears) the DNS token and keeps it across restarts (Consul's
    /// `PUT /v1/agent/token/dns`).
    pub async fn set_dns_token(&self, secret: Option<String>) -> Result<(), AclError> {
        let secret = secret.filter(|s| !s.is_empty());
        let _w = self.writes.lock().await;
        match &secret {
            Some(s) => {
                zhili_store::put(&*self.store, DNS_TOKEN, s.clone().into_bytes()).await?;
            }
            None => {
                zhili_store::delete(&*self.store, DNS_TOKEN).await?;
            }
        }
        self.dns_token.store(secret.map(Arc::new));
        Ok(())
    }

    /// Creates the first management token, once.
    pub async fn bootstrap(&self) -> Result<Token, AclError> {
        let _w = self.writes.lock().await;
        let token = Token {
            accessor_id: random_uuid(),
            secret_id: random_uuid(),
            description: "Bootstrap management token".into(),
            policies: vec![GLOBAL_MANAGEMENT.into()],
            create_index: 0,
        };
        let res = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(BOOTSTRAP.into())],
                success: vec![
                    Op::Put { key: BOOTSTRAP.into(), value: token.accessor_id.clone().into(), lease: None },
                    Op::Put { key: format!("{TOKENS}{}", token.accessor_id), value: serde_json::to_vec(&token).expect("token").into(), lease: None },
                ],
                failure: vec![],
            })
            .await?;
        if !res.succeeded {
            return Err(AclError::AlreadyBootstrapped);
        }
        self.reload()?;
        Ok(Token { create_index: res.revision, ..token })
    }

    pub async fn put_policy(&self, spec: PolicySpec) -> Result<u64, AclError> {
        spec.validate()?;
        if spec.name == GLOBAL_MANAGEMENT {
            return Err(AclError::BuiltIn(spec.name));
        }
        let _w = self.writes.lock().await;
        let rev = zhili_store::put(&*self.store, &format!("{POLICIES}{}", spec.name), serde_json::to_vec(&spec).expect("policy")).await?;
        self.reload()?;
        Ok(rev)
    }

    pub async fn delete_policy(&self, name: &str) -> Result<(), AclError> {
        let _w = self.writes.lock().await;
        let res = zhili_store::delete(&*self.store, &format!("{POLICIES}{name}")).await?;
        if res.deleted.is_empty() {
            return Err(AclError::PolicyNotFound(name.into()));
        }
        self.reload()
    }

    pub fn policies(&self) -> Vec<PolicySpec> {
        let mut v: Vec<PolicySpec> = self.snapshot.load().policies.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn policy(&self, name: &str) -> Option<PolicySpec> {
        self.snapshot.load().policies.get(name).cloned()
    }

    pub async fn create_token(&self, spec: TokenSpec) -> Result<Token, AclError> {
        spec.validate()?;
        {
            let snap = self.snapshot.load();
            for (i, p) in spec.policies.iter().enumerate() {
                if p != GLOBAL_MANAGEMENT && !snap.policies.contains_key(p) {
                    return Err(ValidationError::new(format!("policies[{i}]"), format!("policy {p:?} does not exist")).into());
                }
            }
        }
        let _w = self.writes.lock().await;
        let mut token = Token { accessor_id: random_uuid(), secret_id: random_uuid(), description: spec.description, policies: spec.policies, create_index: 0 };
        let key = format!("{TOKENS}{}", token.accessor_id);
        // create_index is the key's create revision; the stored copy's field is ignored on load.
        token.create_index = zhili_store::put(&*self.store, &key, serde_json::to_vec(&token).expect("token")).await?;
        self.reload()?;
        Ok(token)
    }

    pub async fn delete_token(&self, accessor: &str) -> Result<(), AclError> {
        let _w = self.writes.lock().await;
        let res = zhili_store::delete(&*self.store, &format!("{TOKENS}{accessor}")).await?;
        if res.deleted.is_empty() {
            return Err(AclError::TokenNotFound);
        }
        self.reload()
    }

    pub fn tokens(&self) -> Vec<Token> {
        let mut v: Vec<Token> = self.snapshot.load().tokens.values().cloned().collect();
        v.sort_by_key(|t| t.create_index);
        v
    }

    pub fn token(&self, accessor: &str) -> Option<Token> {
        self.snapshot.load().tokens.get(accessor).cloned()
    }

    /// The token a secret belongs to (for "who am I").
    pub fn token_by_secret(&self, secret: &str) -> Option<Token> {
        let snap = self.snapshot.load();
        snap.by_secret_hash.get(&hash(secret)).filter(|t| bool::from(t.secret_id.as_bytes().ct_eq(secret.as_bytes()))).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhili_model::acl::{Access, Resource};
    use zhili_store::memory::MemoryStore;

    #[tokio::test]
    async fn bootstrap_once_policies_and_tokens() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let acl = Acl::load(store.clone(), true).unwrap();
        assert!(!acl.resolve(None).unwrap().allows(Resource::Kv, "x", Access::Read), "anonymous is denied");
        let root = acl.bootstrap().await.unwrap();
        assert!(matches!(acl.bootstrap().await, Err(AclError::AlreadyBootstrapped)));
        assert!(acl.resolve(Some(&root.secret_id)).unwrap().is_management());
        assert!(matches!(acl.resolve(Some("nope")), Err(AclError::TokenNotFound)));

        let bad = acl.create_token(TokenSpec { description: "x".into(), policies: vec!["missing".into()] }).await.unwrap_err();
        assert!(bad.to_string().contains("policies[0]"), "{bad}");
        acl.put_policy(PolicySpec {
            name: "kv-app".into(),
            description: String::new(),
            rules: vec![Rule { resource: Resource::Kv, prefix: "app/".into(), access: Access::Write }],
        })
        .await
        .unwrap();
        let t = acl.create_token(TokenSpec { description: "app".into(), policies: vec!["kv-app".into()] }).await.unwrap();
        let a = acl.resolve(Some(&t.secret_id)).unwrap();
        assert!(a.allows(Resource::Kv, "app/db", Access::Write));
        assert!(!a.allows(Resource::Kv, "other", Access::Read));
        assert!(!a.allows(Resource::Service, "web", Access::Read));

        // A revocation wakes a holder of the token; a change that leaves its rights alone does not.
        let changes = acl.changes();
        let granted = acl.resolve(Some(&t.secret_id)).unwrap();
        let watcher = {
            let acl = acl.clone();
            let secret = t.secret_id.clone();
            tokio::spawn(async move { acl.revoked(changes, &secret, &granted).await })
        };
        acl.put_policy(PolicySpec { name: "other".into(), description: String::new(), rules: vec![] }).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!watcher.is_finished(), "an unrelated policy change keeps the stream");
        acl.put_policy(PolicySpec { name: "kv-app".into(), description: String::new(), rules: vec![] }).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher).await.expect("narrowed policy ends the stream").unwrap();

        // Survives a reload from the store.
        let again = Acl::load(store, true).unwrap();
        assert!(!again.resolve(Some(&t.secret_id)).unwrap().allows(Resource::Kv, "app/x", Access::Read), "the narrowed policy persisted");
        again.delete_token(&t.accessor_id).await.unwrap();
        assert!(again.resolve(Some(&t.secret_id)).is_err());
    }

    #[tokio::test]
    async fn disabled_acl_allows_everything() {
        let acl = Acl::load(Arc::new(MemoryStore::new()), false).unwrap();
        assert!(acl.resolve(None).unwrap().allows(Resource::Acl, "", Access::Write));
    }
}
