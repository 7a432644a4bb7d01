//! Errors of requests: [`ApiError`], the one map to HTTP statuses and OpenAI error objects
//! (startup errors are [`crate::startup::GatewayError`]).
//!
//! [`ApiError`] is the one error map of the HTTP API: every handler, the JSON extractor and the
//! SSE stream turn failures into it, and it renders the OpenAI error object
//! `{"error": {"message", "type", "param", "code"}}` with the matching status. Internal errors
//! show a generic message; their details travel in an [`InternalDetail`] response extension that
//! the logging middleware writes to the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::images::ImageError;
use crate::validate::ValidationError;

/// Error details of an internal error, attached to the response for the logging middleware.
#[derive(Clone, Debug)]
pub struct InternalDetail(pub String);

/// Every way a request can fail, mapped to an HTTP status and an OpenAI error object.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing, has a wrong value, or the prompt is too long.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// An image could not be fetched, decoded or preprocessed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The body is not JSON, or a field has the wrong JSON type.
    #[error("{message}")]
    BadJson {
        /// Human-readable reason.
        message: String,
        /// The offending field path, if known.
        param: Option<String>,
    },
    /// `model` names another model than the served one.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// The body is larger than the configured limit.
    #[error("Request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The coordinator's queue is full (RESOURCE_EXHAUSTED).
    #[error("The server is overloaded; retry after {retry_after_s} s.")]
    Overloaded {
        /// Seconds for the `Retry-After` header.
        retry_after_s: u64,
    },
    /// No replica can serve now (UNAVAILABLE).
    #[error("The model is not available right now: {0}")]
    Unavailable(String),
    /// No route for this path.
    #[error("Not found: {0}")]
    RouteNotFound(String),
    /// The body did not arrive within the time limit.
    #[error("The request body did not arrive within {0} s.")]
    BodyTimeout(u64),
    /// Anything else; the detail is logged, never sent.
    #[error("Internal server error.")]
    Internal(String),
}

/// The OpenAI error object.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Fields of the OpenAI error object.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// Error class (`invalid_request_error`, `rate_limit_error`, `server_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::Image(_) | ApiError::BadJson { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param) = match self {
            ApiError::Validation(e) => ("invalid_request_error", Some(e.code()), e.param()),
            ApiError::Image(e) => (
                "invalid_request_error",
                Some("invalid_image"),
                Some(e.param.clone()),
            ),
            ApiError::BadJson { param, .. } => {
                ("invalid_request_error", Some("invalid_json"), param.clone())
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_string()),
            ),
            ApiError::RouteNotFound(_) => ("invalid_request_error", Some("not_found"), None),
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"), None)
            }
            ApiError::Overloaded { .. } => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            ApiError::Unavailable(_) => ("server_error", Some("service_unavailable"), None),
            ApiError::BodyTimeout(_) => ("invalid_request_error", Some("request_timeout"), None),
            ApiError::Internal(_) => ("server_error", Some("internal_error"), None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }

    /// Maps a coordinator status: RESOURCE_EXHAUSTED → 429 (Retry-After from the `retry-after`
    /// metadata, else 1 s), UNAVAILABLE → 503, INVALID_ARGUMENT → 400, anything else → 500.
    pub fn from_status(status: &tonic::Status) -> Self {
        match status.code() {
            tonic::Code::ResourceExhausted => {
                let retry_after_s = status
                    .metadata()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .max(1);
                ApiError::Overloaded { retry_after_s }
            }
            tonic::Code::Unavailable => ApiError::Unavailable(status.message().to_string()),
            tonic::Code::InvalidArgument => ApiError::Validation(ValidationError::Rejected {
                reason: status.message().to_string(),
            }),
            _ => ApiError::Internal(format!("coordinator: {status}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(self.body())).into_response();
        match &self {
            ApiError::Overloaded { retry_after_s } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::Internal(detail) => {
                response
                    .extensions_mut()
                    .insert(InternalDetail(detail.clone()));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(e: &ApiError) -> serde_json::Value {
        serde_json::to_value(e.body()).expect("error body serialises")
    }

    #[test]
    fn statuses_and_types() {
        let cases: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            (
                ApiError::ModelNotFound("x".into()),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            (
                ApiError::Overloaded { retry_after_s: 3 },
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                ApiError::Unavailable("x".into()),
                503,
                "server_error",
                Some("service_unavailable"),
            ),
            (
                ApiError::Internal("secret".into()),
                500,
                "server_error",
                Some("internal_error"),
            ),
        ];
        for (err, status, kind, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let v = json_of(&err);
            assert_eq!(v["error"]["type"], kind);
            assert_eq!(v["error"]["code"].as_str(), code);
            assert!(
                v["error"].get("param").is_some(),
                "param key always present"
            );
        }
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let v = json_of(&ApiError::Internal("db password 1234".into()));
        assert_eq!(v["error"]["message"], "Internal server error.");
        let resp = ApiError::Internal("db password 1234".into()).into_response();
        assert_eq!(
            resp.extensions()
                .get::<InternalDetail>()
                .map(|d| d.0.as_str()),
            Some("db password 1234")
        );
    }

    #[test]
    fn validation_error_names_field() {
        let e = ApiError::from(ValidationError::OutOfRange {
            field: "temperature".into(),
            bound: "in [0, 2]".into(),
            value: "3".into(),
        });
        let v = json_of(&e);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(
            v["error"]["message"],
            "`temperature` must be in [0, 2], got 3"
        );
    }

    #[test]
    fn status_mapping() {
        let mut s = tonic::Status::resource_exhausted("queue full");
        s.metadata_mut()
            .insert("retry-after", "7".parse().expect("ascii"));
        assert!(matches!(
            ApiError::from_status(&s),
            ApiError::Overloaded { retry_after_s: 7 }
        ));
        let s = tonic::Status::resource_exhausted("queue full");
        let resp = ApiError::from_status(&s).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(
            ApiError::from_status(&tonic::Status::unavailable("x")).status(),
            503
        );
        assert_eq!(
            ApiError::from_status(&tonic::Status::invalid_argument("x")).status(),
            400
        );
        assert_eq!(
            ApiError::from_status(&tonic::Status::internal("x")).status(),
            500
        );
    }
}
