//! `UploadProgress\Hub::run()`: the hub in the foreground of a CLI process.
//! The auto-spawned hub runs exactly this, with the bound ingest socket
//! inherited on fd 3 and the spawning worker's settings on fd 4.

use crate::hub::{self, HubOptions};
use crate::php::errors::Exception;
use crate::php::{ini, recorder};
use crate::recorder::spawn::{self, ENV_WATCH_PID};
use ext_php_rs::exception::PhpException;
use ext_php_rs::prelude::*;
use std::os::unix::net::UnixListener;

#[php_class]
#[php(name = "UploadProgress\\Hub")]
#[derive(Default)]
pub struct Hub;

fn exception(msg: String) -> PhpException {
    PhpException::from_class::<Exception>(msg)
}

#[php_impl]
impl Hub {
    /// Runs the hub until SIGTERM/SIGINT (or until the watched FPM master exits).
    pub fn run() -> PhpResult<()> {
        // A spawned hub runs with exactly the settings of the worker that
        // spawned it; a hub started by hand reads php.ini.
        let cfg = match spawn::inherited_config() {
            Some(Ok(cfg)) => {
                ini::set_config(cfg.clone());
                cfg
            }
            Some(Err(e)) => return Err(exception(format!("Hub::run(): {e}"))),
            None => ini::config().clone(),
        };
        // The PHP CLI installs its own SIGTERM/SIGINT handlers, which the hub's
        // handlers would chain to: they re-raise and kill the process before
        // the graceful shutdown (close 4200) can run.
        // SAFETY: resetting signal dispositions in this single PHP thread,
        // before the hub's runtime starts.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
        // The root holds the secret, pid and log: refuse one another user could touch.
        crate::storage::root::Root::open(&cfg.storage_dir)
            .map_err(|e| PhpException::from_class::<Exception>(format!("Hub::run(): {e}")))?;
        if cfg.app_secret.is_empty() {
            // An empty HMAC key would let anyone sign private subscriptions.
            let why = format!(
                "no app secret: set upload_progress.app_secret or make {} writable",
                cfg.storage_dir.display()
            );
            let _ = spawn::with_state(&cfg.hub_file("spawn"), |s| s.exited(&why));
            return Err(exception(format!("Hub::run(): {why}")));
        }
        let listener = match spawn::inherited_listener() {
            Some(fd) => fd,
            None => spawn::bind_listener(&cfg.hub_socket).map_err(|e| {
                let why = if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    "another hub already serves it".to_owned()
                } else {
                    e.to_string()
                };
                exception(format!(
                    "Hub::run(): cannot bind the ingest socket \"{}\": {why}",
                    cfg.hub_socket
                ))
            })?,
        };
        let watch_pid = std::env::var(ENV_WATCH_PID)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|p| *p > 1);
        std::env::remove_var(ENV_WATCH_PID);
        let _ = std::fs::create_dir_all(&cfg.storage_dir);
        let state_file = cfg.hub_file("spawn");
        // 0600, no symlink followed, not another user's file; removed when run() returns.
        let _pid_file = spawn::PidFile::write(&cfg.hub_file("pid"))
            .map_err(|e| hub::log(format_args!("no pid file: {e}")))
            .ok();
        // Still serving after a few seconds: the workers' spawn backoff starts over.
        let run = spawn::HubRun::start(state_file);
        let redis_url = cfg.redis_url.clone();
        let secret = cfg.app_secret.clone();
        let result = hub::run(HubOptions {
            config: cfg,
            version: recorder::VERSION.to_owned(),
            ingest: UnixListener::from(listener),
            watch_pid,
        });
        if let Err(e) = &result {
            // The workers log this once and back off before the next spawn.
            let reason = crate::redis_url::scrub(e, &redis_url, &secret);
            run.failed(&reason);
        }
        drop(run);
        result.map_err(|e| {
            exception(format!(
                "Hub::run(): {}",
                crate::redis_url::scrub(&e, &redis_url, &secret)
            ))
        })
    }
}
