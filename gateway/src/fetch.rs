//! Fetching http(s) image URLs without reaching internal addresses.
//!
//! Unless private URLs are allowed, three guards keep a request from reaching loopback, private,
//! link-local or unspecified addresses: a literal IP host is checked before connecting, every
//! host name is resolved by [`GuardedResolver`] (which refuses the whole name if any of its
//! addresses is internal), and every redirect hop is checked the same way. Proxies from the
//! environment are ignored so they cannot bypass the resolver. The body is read in chunks and
//! abandoned once it exceeds the size limit; the whole fetch has a time limit.

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

/// Whether `ip` is internal: loopback, private, link-local, unspecified, carrier-grade NAT,
/// broadcast, `0.0.0.0/8`, IPv6 unique-local or site-local, or an IPv4-mapped internal address.
pub fn is_internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (first & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (first & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10 shared address space
}

/// The literal IP of a URL's host, if the host is one.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// A refused address, carried through reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("refused non-public address {0}")]
struct Refused(IpAddr);

/// DNS resolver that refuses names resolving to internal addresses.
#[derive(Debug)]
pub struct GuardedResolver {
    allow_internal: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_internal;
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
fn redirect_policy(allow_internal: bool) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error("too many redirects");
        }
        if !matches!(attempt.url().scheme(), "http" | "https") {
            return attempt.error("redirect to a non-http(s) URL");
        }
        match literal_ip(attempt.url()) {
            Some(ip) if !allow_internal && is_internal_ip(ip) => attempt.error(Refused(ip)),
            _ => attempt.follow(),
        }
    })
}

/// Fetches image URLs under the address, size and time limits.
#[derive(Clone, Debug)]
pub struct ImageFetcher {
    client: Client,
    allow_internal: bool,
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
        let client = Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow_internal }))
            .redirect(redirect_policy(allow_internal))
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("r4b-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        Ok(ImageFetcher {
            client,
            allow_internal,
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
            if !self.allow_internal && is_internal_ip(ip) {
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
        };
        let name: Name = "localhost".parse().expect("name");
        let err = r.resolve(name).await.err().expect("refused");
        assert!(err.downcast_ref::<Refused>().is_some(), "{err}");
        let r = GuardedResolver {
            allow_internal: true,
        };
        let name: Name = "localhost".parse().expect("name");
        assert!(r.resolve(name).await.is_ok());
    }
}
