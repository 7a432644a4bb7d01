//! Gateway settings ([`GatewayConfig`]) with documented defaults.

use std::time::Duration;

/// Settings of one gateway process. Build with [`GatewayConfig::new`] and override fields.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Name clients must send as `model` (`--served-model-name`).
    pub served_model_name: String,
    /// Longest prompt + output in tokens; 0 = take the coordinator's `max_model_len`. When both
    /// are set the smaller wins.
    pub max_model_len: usize,
    /// Largest request body in bytes (default 32 MiB); larger bodies get 413.
    pub body_limit_bytes: usize,
    /// Largest `n` (choices per request), default 8.
    pub max_n: u32,
    /// Most images in one request, default 8.
    pub max_images_per_request: usize,
    /// Largest encoded image (data URI payload or fetched body) in bytes, default 20 MiB.
    pub max_image_bytes: usize,
    /// Largest `width * height`, checked from the image header before decoding. Default
    /// 33,177,600 (8K UHD, 7680x4320): far above the largest anyres canvas R-4B uses (2304x2304,
    /// 5.3 Mpx; larger images are scaled down anyway), and small enough that a decompression bomb
    /// declaring 8000x8000 is refused before any pixel is decoded.
    pub max_image_pixels: u64,
    /// Allow image URLs that resolve to loopback, private, link-local or unspecified addresses.
    pub allow_private_image_urls: bool,
    /// TLS to the coordinators (`https://` URLs): their CA, and this gateway's client
    /// certificate for mutual TLS. `None`: plain connections.
    pub coordinator_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Hosts (`host` or `host:port`) whose image URLs skip the address guards: the operator's
    /// own media servers on a private network. Redirects from them are still checked.
    pub allowed_media_hosts: Vec<String>,
    /// Time limit for fetching one http(s) image, default 10 s.
    pub image_fetch_timeout: Duration,
    /// Thinking budget used when a request sets none (`None` = no budget).
    pub default_max_thinking_tokens: Option<u32>,
    /// `/ready` needs the replica's last successful step to be at most this old, in addition to
    /// its `ready` flag. `Duration::ZERO` (the default) trusts the flag alone.
    pub ready_window: Duration,
    /// Most stop strings per request, default 16.
    pub max_stop_strings: usize,
    /// Largest `top_logprobs`, default 20.
    pub max_top_logprobs: u32,
    /// Time limit of the small coordinator RPCs (Health, Load, ModelInfo), default 5 s.
    pub rpc_timeout: Duration,
    /// How long [`crate::AppState::connect`] keeps retrying ModelInfo while no coordinator
    /// answers, default 30 s.
    pub connect_timeout: Duration,
    /// Time limit for receiving a request body once its headers arrived, default 60 s (408).
    pub body_read_timeout: Duration,
    /// Most bytes of decoded pixels (`width · height · 4` per image) all requests together may
    /// hold while images decode, default 1 GiB. An image waits for room, so a burst of large
    /// images cannot grow the gateway's memory beyond this.
    pub max_decode_bytes: u64,
    /// Accepted API keys (`Authorization: Bearer`); none: no key needed.
    pub api_keys: crate::auth::ApiKeys,
    /// Whether `/health`, `/ready` and `/metrics` need a key too.
    pub auth_probes: bool,
    /// Whether special tokens typed in message content become control tokens (the old,
    /// forgeable behaviour); default false: only the chat template places control tokens.
    pub allow_special_tokens_in_content: bool,
    /// What every call to a coordinator carries (`r4b_proto::auth`); none: calls go without.
    pub cluster_secret: Option<r4b_proto::auth::Secret>,
    /// How a request picks its replica (default: prefix-aware, see [`crate::replica`]).
    pub routing: crate::replica::Routing,
    /// Prefix-aware routing gives up a replica's cached prefix when its load (requests waiting
    /// and running) exceeds the least loaded replica's by more than this; default 4.
    pub prefix_overload_slack: u32,
}

impl GatewayConfig {
    /// Defaults for a model served as `served_model_name`.
    pub fn new(served_model_name: impl Into<String>) -> Self {
        GatewayConfig {
            served_model_name: served_model_name.into(),
            max_model_len: 0,
            body_limit_bytes: 32 << 20,
            max_n: 8,
            max_images_per_request: 8,
            max_image_bytes: 20 << 20,
            max_image_pixels: 33_177_600,
            allow_private_image_urls: false,
            allowed_media_hosts: Vec::new(),
            coordinator_tls: None,
            image_fetch_timeout: Duration::from_secs(10),
            default_max_thinking_tokens: None,
            ready_window: Duration::ZERO,
            max_stop_strings: 16,
            max_top_logprobs: 20,
            rpc_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            max_decode_bytes: 1 << 30,
            api_keys: crate::auth::ApiKeys::default(),
            auth_probes: false,
            allow_special_tokens_in_content: false,
            cluster_secret: None,
            routing: crate::replica::Routing::default(),
            prefix_overload_slack: 4,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::new("r4b")
    }
}
