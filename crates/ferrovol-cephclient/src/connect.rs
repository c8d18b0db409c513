//! Connections to the cluster, one per set of credentials, kept open.
//!
//! Credentials come from the driver's flags (a keyring), or per request
//! from CSI secrets with ceph-csi's keys: `adminID`/`adminKey` for the
//! controller, `userID`/`userKey` for both halves. Keys are never logged
//! and only their hash names a cached connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferrovol_ceph::{self as ceph, Cluster, Pool};
use ferrovol_core::engine::Secrets;

use crate::error::{self, Result};
use crate::helper::Auth;
use crate::{blocking, ceph_error};

/// How the driver reaches the cluster when a request carries no secrets.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// ceph.conf with the monitors (None: librados' default search).
    pub conf: Option<PathBuf>,
    /// Client id without "client." (None: admin).
    pub user: Option<String>,
    pub keyring: Option<PathBuf>,
    /// The client's key itself (from `--ceph-secret-dir`): wins over the
    /// keyring.
    pub key: Option<String>,
    /// Seconds a monitor or OSD call may take.
    pub op_timeout: u64,
}

impl ClusterConfig {
    /// The default client from a directory holding a Kubernetes Secret with
    /// ceph-csi's keys, as a Secret volume mounts it (one file per key):
    /// `adminID`/`adminKey` for the controller (else `userID`/`userKey`),
    /// `userID`/`userKey` for the node. The same Secret the StorageClass
    /// names serves the driver's own calls (Probe, listings, capacity),
    /// so the operator makes one credential, not two.
    pub fn use_secret_dir(&mut self, dir: &std::path::Path, admin: bool) -> Result<()> {
        let read = |name: &str| -> Result<Option<String>> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(v) => Ok(Some(v.trim().to_string()).filter(|v| !v.is_empty())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => {
                    Err(error::precondition(format!("reading {}: {e}", dir.join(name).display())))
                }
            }
        };
        let pairs: &[(&str, &str)] = if admin {
            &[("adminID", "adminKey"), ("userID", "userKey")]
        } else {
            &[("userID", "userKey")]
        };
        for (id, key) in pairs {
            if let (Some(i), Some(k)) = (read(id)?, read(key)?) {
                self.user = Some(i);
                self.key = Some(k);
                return Ok(());
            }
        }
        let wanted: Vec<String> = pairs.iter().map(|(i, k)| format!("{i} and {k}")).collect();
        Err(error::precondition(format!(
            "{} holds no Ceph credentials: it needs the files {}",
            dir.display(),
            wanted.join(", or ")
        )))
    }
}

/// Credentials and where the cluster is: enough to connect again later.
#[derive(Clone)]
pub struct Login {
    config: Arc<ClusterConfig>,
    creds: Credentials,
}

impl Login {
    /// Connects with `connect`, blocking; refused credentials are
    /// UNAUTHENTICATED, a missing cluster FAILED_PRECONDITION.
    fn with<T>(&self, connect: impl FnOnce(&ceph::Connect<'_>) -> ceph::Result<T>) -> Result<T> {
        let (config, c) = (&self.config, &self.creds);
        // A request's own secret, else the driver's default client.
        let (user, key) = match &c.key {
            Some(k) => (c.user.as_deref(), Some(k.as_str())),
            None => (config.user.as_deref(), config.key.as_deref()),
        };
        let how = ceph::Connect {
            conf: config.conf.as_deref(),
            user,
            key,
            keyring: if key.is_some() { None } else { config.keyring.as_deref() },
            mon_host: None,
            op_timeout: config.op_timeout,
        };
        connect(&how).map_err(|e| match e.errno {
            // Refused credentials: a wrong or malformed key, an unknown
            // user (the caller's to fix, not retried as they are).
            libc::EACCES | libc::EPERM => {
                error::unauthenticated(format!("{e} (the cluster refused this user's key)"))
            }
            libc::EINVAL if key.is_some() => {
                error::unauthenticated(format!("{e} (the key is not a valid Ceph key)"))
            }
            libc::ENOENT | libc::EINVAL => {
                error::precondition(format!("{e} (check --ceph-conf and the credentials)"))
            }
            _ => ceph_error(e),
        })
    }

    /// Who logs in (user and key): what tells two logins apart, never
    /// shown.
    pub fn identity(&self) -> String {
        format!("{:?}\0{:?}", self.creds.user, self.creds.key)
    }

    /// Mounts file system `fs` (libcephfs), blocking.
    pub fn mount_fs(&self, fs: &str) -> Result<ceph::fs::FsMount> {
        self.with(|how| ceph::fs::FsMount::mount(how, fs))
    }
}

/// Credentials one request uses.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Credentials {
    user: Option<String>,
    key: Option<String>,
}

impl Credentials {
    /// The controller prefers the admin pair, the node the user pair.
    fn from_secrets(secrets: &Secrets, admin: bool) -> Result<Credentials> {
        let pairs: &[(&str, &str)] = if admin {
            &[("adminID", "adminKey"), ("userID", "userKey")]
        } else {
            &[("userID", "userKey")]
        };
        for (id, key) in pairs {
            match (secrets.get(id), secrets.get(key)) {
                (Some(i), Some(k)) if !i.is_empty() && !k.is_empty() => {
                    return Ok(Credentials { user: Some(i.into()), key: Some(k.into()) })
                }
                (None, None) => {}
                _ => {
                    return Err(error::invalid(format!(
                        "the secret must carry both {id} and {key}, or neither"
                    )))
                }
            }
        }
        Ok(Credentials { user: None, key: None })
    }
}

#[derive(Clone)]
pub struct Connections {
    config: Arc<ClusterConfig>,
    clusters: Arc<Mutex<HashMap<Credentials, Cluster>>>,
    pools: Arc<Mutex<HashMap<(Credentials, String), Pool>>>,
}

impl Connections {
    pub fn new(config: ClusterConfig) -> Result<Connections> {
        ceph::libraries().map_err(error::precondition)?;
        Ok(Connections {
            config: Arc::new(config),
            clusters: Arc::default(),
            pools: Arc::default(),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The graceful end: every pool (I/O context) closed, then every
    /// cluster connection shut down, in that order, while the process is
    /// still whole. Answers how many connections something else still
    /// holds (shut down when it lets go).
    pub fn shutdown(&self) -> usize {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let clusters: Vec<Cluster> = self
            .clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        clusters.into_iter().filter(|c| !c.is_last()).count()
    }

    async fn cluster_as(&self, creds: &Credentials) -> Result<Cluster> {
        if let Some(c) =
            self.clusters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(creds)
        {
            return Ok(c.clone());
        }
        let login = Login { config: self.config.clone(), creds: creds.clone() };
        let cluster = blocking(move || login.with(Cluster::connect)).await?;
        let mut all = self.clusters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(all.entry(creds.clone()).or_insert(cluster).clone())
    }

    /// What a file system client of the controller (libcephfs, for
    /// copies) logs in with: the request's credentials (the admin pair
    /// first), else the driver's default client. Kept by a copy that
    /// outlives its request.
    pub fn fs_login(&self, secrets: &Secrets) -> Result<Login> {
        let creds = Credentials::from_secrets(secrets, true)?;
        Ok(Login { config: self.config.clone(), creds })
    }

    /// The default credentials' connection.
    pub async fn default_cluster(&self) -> Result<Cluster> {
        self.cluster_as(&Credentials { user: None, key: None }).await
    }

    /// A pool, with the credentials the request carried (controller side).
    pub async fn pool(&self, name: &str, secrets: &Secrets) -> Result<Pool> {
        self.pool_as(name, Credentials::from_secrets(secrets, true)?).await
    }

    /// A pool with the node's credentials from the request's secrets.
    pub async fn node_pool(&self, name: &str, secrets: &Secrets) -> Result<Pool> {
        self.pool_as(name, Credentials::from_secrets(secrets, false)?).await
    }

    /// The cluster with the credentials the request carried (controller
    /// side: the admin pair first).
    pub async fn cluster(&self, secrets: &Secrets) -> Result<Cluster> {
        self.cluster_as(&Credentials::from_secrets(secrets, true)?).await
    }

    pub async fn node_cluster(&self, secrets: &Secrets) -> Result<Cluster> {
        self.cluster_as(&Credentials::from_secrets(secrets, false)?).await
    }

    async fn pool_as(&self, name: &str, creds: Credentials) -> Result<Pool> {
        let key = (creds, name.to_string());
        if let Some(p) =
            self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key)
        {
            return Ok(p.clone());
        }
        let cluster = self.cluster_as(&key.0).await?;
        let pool_name = name.to_string();
        let pool = blocking(move || {
            cluster.pool(&pool_name).map_err(|e| match e.errno {
                libc::ENOENT => error::not_found(format!("pool {pool_name:?} does not exist")),
                _ => ceph_error(e),
            })
        })
        .await?;
        let mut all = self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(all.entry(key).or_insert(pool).clone())
    }

    /// How a helper process (rbd-fuse, rbd-nbd, ceph-fuse) reaches the
    /// cluster: the node's own config, with the user and key the request
    /// carried, if any, in place of the driver's default client.
    pub fn helper_auth(&self, secrets: &Secrets) -> Result<Auth> {
        let c = Credentials::from_secrets(secrets, false)?;
        let config = &self.config;
        Ok(Auth {
            conf: config.conf.clone(),
            user: c.user.or(config.user.clone()),
            keyring: config.keyring.clone(),
            key: c.key.or(config.key.clone()),
        })
    }
}
