//! The thin host layer: turns the pure modules' decisions into proxy-wasm calls.
mod host;
mod http;
mod metrics;
mod root;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // A panic aborts the VM (panic = "abort"); say why before it goes.
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("apikey-filter panicked: {info}"));
    }));
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}
