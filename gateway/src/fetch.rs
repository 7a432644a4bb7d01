//! Fetching http(s) image URLs without reaching internal addresses.
//!
//! Unless private URLs are allowed, three guards keep a request from reaching loopback, private,
//! link-local or unspecified addresses: a literal IP host is checked before connecting, every
//! host name is resolved by [`GuardedResolver`] (which refuses the whole name if any of its
//! addresses is internal), and every redirect hop is checked the same way. Proxies from the
//! environment are ignored so they cannot bypass the resolver. The body is read in chunks and
//! abandoned once it exceeds the size limit; the whole fetch has a time limit.
//!
//! An operator may name hosts of their own that the guards let through ([`AllowedHosts`],
//! `--allowed-media-hosts`, like vLLM's `--allowed-media-domains` for the other direction): a URL
//! whose host (and port, when the entry names one) is listed skips the address checks; every
//! other hop, redirects from a listed host included, is checked as usual.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Client, Url};

/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;

/// Why a URL could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an absolute http(s) URL.
    #[error("not a valid http(s) URL")]
    BadUrl,
    /// The host is or resolves to an internal address.
    #[error("the host resolves to the non-public address {addr}; such URLs are refused")]
    Forbidden {
        /// The refused address.
        addr: IpAddr,
    },
    /// The body is larger than the limit.
    #[error("the image is larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The fetch took longer than the limit.
    #[error("fetching timed out after {secs:.1} s")]
    Timeout {
        /// The limit in seconds.
        secs: f64,
    },
    /// The server answered with a non-success status.
    #[error("the server answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// Connection, TLS or protocol failure.
    #[error("fetch failed: {0}")]
    Transport(String),
}

/// Whether `ip` is internal, i.e. not a global unicast address: loopback, private, link-local,
/// unspecified, carrier-grade NAT, broadcast, `0.0.0.0/8`, `192.0.0.0/24`, documentation ranges,
/// benchmarking `198.18.0.0/15`, reserved `240.0.0.0/4`, multicast; for IPv6 also unique-local,
/// site-local, multicast, documentation, the whole IPv4-compatible `::/96` (deprecated, refused
/// outright), Teredo `2001::/32` (refused outright), and the forms that embed an IPv4 address
/// (IPv4-mapped, 6to4 `2002::/16`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`), which are judged
/// by the embedded address.
pub fn is_internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_internal_v4(v4);
            }
            let seg = v6.segments();
            let first = seg[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || seg[..6] == [0; 6] // rest of the IPv4-compatible ::/96
                || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (first & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (first & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
                || (first & 0xff00) == 0xff00 // ff00::/8 multicast
                || (first == 0x2001 && seg[1] == 0x0db8) // 2001:db8::/32 documentation
                || (first == 0x2001 && seg[1] == 0) // 2001::/32 Teredo
                || first == 0x0100 && seg[1..4] == [0; 3] // 100::/64 discard-only
        }
    }
}

/// The IPv4 address embedded in an IPv4-mapped, 6to4 or NAT64 IPv6 address.
fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = v6.segments();
    let o = v6.octets();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if seg[0] == 0x2002 {
        // 6to4: 2002:AABB:CCDD::/48
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
    {
        // NAT64 well-known 64:ff9b::/96 and local-use 64:ff9b:1::/48: last 32 bits
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast() // 224.0.0.0/4
        || v4.is_documentation() // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || a == 0
        || a >= 240 // 240.0.0.0/4 reserved
        || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10 shared address space
        || (a == 198 && (b == 18 || b == 19)) // 198.18.0.0/15 benchmarking
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24 IETF protocol assignments
        || (a == 192 && b == 88 && c == 99) // 192.88.99.0/24 6to4 relay anycast
}

/// The literal IP of a URL's host, if the host is one.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Hosts whose URLs skip the address guards: entries `host` (any port) or `host:port`, IPv6
/// literals with or without brackets (`[fd00::1]:8080`), compared without case.
#[derive(Clone, Debug, Default)]
pub struct AllowedHosts(Arc<Vec<(String, Option<u16>)>>);

impl AllowedHosts {
    /// Parses the entries; an entry that is not `host` or `host:port` is refused by name.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            let url = Url::parse(&format!("http://{e}/"))
                .map_err(|_| format!("`{e}` is not a host or host:port"))?;
            let host = url
                .host_str()
                .filter(|_| url.path() == "/" && url.username().is_empty())
                .ok_or_else(|| format!("`{e}` is not a host or host:port"))?;
            out.push((bare(host), url.port()));
        }
        Ok(AllowedHosts(Arc::new(out)))
    }

    /// Whether `url`'s host and port are listed.
    fn allows_url(&self, url: &Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        let host = bare(host);
        self.0
            .iter()
            .any(|(h, p)| *h == host && p.is_none_or(|p| p == port))
    }

    /// Whether a host name is listed (for the resolver, which sees no port).
    fn allows_name(&self, name: &str) -> bool {
        let name = bare(name);
        self.0.iter().any(|(h, _)| *h == name)
    }
}

/// A host without IPv6 brackets, lower case.
fn bare(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// A refused address, carried through reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("refused non-public address {0}")]
struct Refused(IpAddr);

/// DNS resolver that refuses names resolving to internal addresses.
#[derive(Debug)]
pub struct GuardedResolver {
    allow_internal: bool,
    allowed: AllowedHosts,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_internal || self.allowed.allows_name(name.as_str());
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow {
                if let Some(bad) = addrs.iter().find(|a| is_internal_ip(a.ip())) {
                    return Err(
                        Box::new(Refused(bad.ip())) as Box<dyn std::error::Error + Send + Sync>
                    );
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Checks one redirect hop: http(s) only, at most [`MAX_REDIRECTS`], no literal internal IP.
fn redirect_policy(allow_internal: bool, allowed: AllowedHosts) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error("too many redirects");
        }
        if !matches!(attempt.url().scheme(), "http" | "https") {
            return attempt.error("redirect to a non-http(s) URL");
        }
        match literal_ip(attempt.url()) {
            Some(ip)
                if !allow_internal && is_internal_ip(ip) && !allowed.allows_url(attempt.url()) =>
            {
                attempt.error(Refused(ip))
            }
            _ => attempt.follow(),
        }
    })
}

/// Fetches image URLs under the address, size and time limits.
#[derive(Clone, Debug)]
pub struct ImageFetcher {
    client: Client,
    allow_internal: bool,
    allowed: AllowedHosts,
    max_bytes: usize,
    timeout: Duration,
}

impl ImageFetcher {
    /// A fetcher; `allow_internal` lifts the address guards.
    pub fn new(
        allow_internal: bool,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Self, FetchError> {
        Self::with_allowed_hosts(allow_internal, AllowedHosts::default(), max_bytes, timeout)
    }

    /// A fetcher whose guards let `allowed` hosts through.
    pub fn with_allowed_hosts(
        allow_internal: bool,
        allowed: AllowedHosts,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Self, FetchError> {
        let client = Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow_internal,
                allowed: allowed.clone(),
            }))
            .redirect(redirect_policy(allow_internal, allowed.clone()))
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("r4b-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        Ok(ImageFetcher {
            client,
            allow_internal,
            allowed,
            max_bytes,
            timeout,
        })
    }

    /// Checks a URL before any network traffic: http(s), and no literal internal IP.
    pub fn precheck(&self, url: &str) -> Result<Url, FetchError> {
        let url = Url::parse(url).map_err(|_| FetchError::BadUrl)?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(FetchError::BadUrl);
        }
        if let Some(ip) = literal_ip(&url) {
            if !self.allow_internal && is_internal_ip(ip) && !self.allowed.allows_url(&url) {
                return Err(FetchError::Forbidden { addr: ip });
            }
        }
        Ok(url)
    }

    /// Fetches `url`'s body.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let url = self.precheck(url)?;
        match tokio::time::timeout(self.timeout, self.fetch_body(url)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                secs: self.timeout.as_secs_f64(),
            }),
        }
    }

    async fn fetch_body(&self, url: Url) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.map_error(&e))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                status: resp.status().as_u16(),
            });
        }
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge {
                limit: self.max_bytes,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.map_error(&e))? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn map_error(&self, e: &reqwest::Error) -> FetchError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(Refused(addr)) = err.downcast_ref::<Refused>() {
                return FetchError::Forbidden { addr: *addr };
            }
            source = err.source();
        }
        if e.is_timeout() {
            return FetchError::Timeout {
                secs: self.timeout.as_secs_f64(),
            };
        }
        FetchError::Transport(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip literal")
    }

    #[test]
    fn internal_addresses() {
        for s in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fe80::abcd:1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            // issue 15: IPv4-compatible, 6to4 and NAT64 forms of internal addresses
            "::7f00:1",
            "::127.0.0.1",
            "::a00:1",
            "::8.8.8.8",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "ff02::1",
            "ff0e::1",
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "250.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.88.99.1",
        ] {
            assert!(is_internal_ip(ip(s)), "{s} must be internal");
        }
    }

    #[test]
    fn public_addresses() {
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "192.169.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "64:ff9b::808:808",
        ] {
            assert!(!is_internal_ip(ip(s)), "{s} must be public");
        }
    }

    fn fetcher(allow: bool) -> ImageFetcher {
        ImageFetcher::new(allow, 1024, Duration::from_secs(1)).expect("client")
    }

    #[test]
    fn precheck_refuses_literal_internal_hosts() {
        let f = fetcher(false);
        for url in [
            "http://127.0.0.1/x.png",
            "https://10.1.2.3:8443/a",
            "http://192.168.0.10/",
            "http://[::1]:80/",
            "http://[fe80::1]/",
            "http://[::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[64:ff9b::7f00:1]/",
            "http://198.18.0.1/",
            "http://240.0.0.1/",
            "http://224.0.0.1/",
        ] {
            assert!(
                matches!(f.precheck(url), Err(FetchError::Forbidden { .. })),
                "{url}"
            );
        }
        assert!(f.precheck("http://93.184.216.34/x.png").is_ok());
        assert!(f.precheck("https://example.com/x.png").is_ok());
        assert!(matches!(
            f.precheck("ftp://example.com/x"),
            Err(FetchError::BadUrl)
        ));
        assert!(matches!(
            f.precheck("file:///etc/passwd"),
            Err(FetchError::BadUrl)
        ));
        assert!(matches!(f.precheck("not a url"), Err(FetchError::BadUrl)));
        assert!(fetcher(true).precheck("http://127.0.0.1/x.png").is_ok());
    }

    #[tokio::test]
    async fn resolver_refuses_localhost_name() {
        let r = GuardedResolver {
            allow_internal: false,
            allowed: AllowedHosts::default(),
        };
        let name: Name = "localhost".parse().expect("name");
        let err = r.resolve(name).await.err().expect("refused");
        assert!(err.downcast_ref::<Refused>().is_some(), "{err}");
        let r = GuardedResolver {
            allow_internal: true,
            allowed: AllowedHosts::default(),
        };
        let name: Name = "localhost".parse().expect("name");
        assert!(r.resolve(name).await.is_ok());
        // A listed name resolves; another internal one still does not.
        let r = GuardedResolver {
            allow_internal: false,
            allowed: AllowedHosts::new(&["LocalHost:8080"]).expect("entries"),
        };
        assert!(r.resolve("localhost".parse().expect("name")).await.is_ok());
    }

    #[test]
    fn allowed_hosts_match_host_and_port() {
        let a = AllowedHosts::new(&["media.internal", "10.0.0.5:9000", "[fd00::1]:80"])
            .expect("entries");
        let u = |s: &str| Url::parse(s).expect("url");
        assert!(a.allows_url(&u("http://media.internal:1234/x.png")));
        assert!(a.allows_url(&u("http://10.0.0.5:9000/x.png")));
        assert!(!a.allows_url(&u("http://10.0.0.5:9001/x.png")));
        assert!(!a.allows_url(&u("http://10.0.0.5/x.png")));
        assert!(a.allows_url(&u("http://[fd00::1]/x.png")));
        assert!(!a.allows_url(&u("http://[fd00::2]/x.png")));
        assert!(AllowedHosts::new(&["http://x/"]).is_err());
        assert!(AllowedHosts::new(&["a/b"]).is_err());
        let f = ImageFetcher::with_allowed_hosts(false, a, 1024, Duration::from_secs(1))
            .expect("client");
        assert!(f.precheck("http://10.0.0.5:9000/x.png").is_ok());
        assert!(matches!(
            f.precheck("http://10.0.0.6:9000/x.png"),
            Err(FetchError::Forbidden { .. })
        ));
    }
}
