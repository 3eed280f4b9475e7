//! `php --ri upload_progress` / phpinfo(): version, hub state (with why it
//! does not run), every directive (secrets masked by their displayers, ini.rs).

use crate::php::{functions, recorder, sapi};
use ext_php_rs::zend::ModuleEntry;
use ext_php_rs::{info_table_end, info_table_row, info_table_start};
use std::panic::catch_unwind;

/// # Safety
/// Called by PHP with its own module entry.
pub unsafe extern "C" fn module_info(module: *mut ModuleEntry) {
    let _ = catch_unwind(|| {
        info_table_start!();
        info_table_row!("upload_progress support", "enabled");
        info_table_row!("version", recorder::VERSION);
        let hub = functions::status_map()
            .map(|m| {
                let running = m
                    .get("running")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                if running {
                    format!(
                        "running (pid {}, {} connections)",
                        m.get("pid").map_or("?".into(), ToString::to_string),
                        m.get("connections").map_or("0".into(), ToString::to_string)
                    )
                } else if let Some(err) = m.get("error").and_then(serde_json::Value::as_str) {
                    format!("not running: {err}")
                } else if let Some(err) = m.get("spawn_error").and_then(serde_json::Value::as_str) {
                    format!(
                        "not running: the last hub exited: {err}; next start in {} s",
                        m.get("next_spawn_in_s")
                            .map_or("0".into(), ToString::to_string)
                    )
                } else {
                    "not running".to_owned()
                }
            })
            .unwrap_or_else(|| "not running".to_owned());
        info_table_row!("hub", hub.as_str());
        let dir = &crate::php::ini::config().storage_dir;
        let storage = match crate::storage::root::check(dir) {
            Ok(true) => format!("ok ({})", dir.display()),
            Ok(false) => format!("{} (created on first use)", dir.display()),
            Err(e) => format!("refused: {e}"),
        };
        info_table_row!("storage root", storage.as_str());
        info_table_end!();
    });
    if let Some(syms) = sapi::get() {
        // SAFETY: `module` is the entry PHP handed to this info function.
        unsafe { syms.display_ini_entries(module) };
    }
}
