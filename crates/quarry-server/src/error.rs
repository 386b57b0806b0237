//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status that says whose fault it is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use quarry_engine::EngineError;
use serde_json::json;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, `server_error`…
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about request field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::bad_request(message).with_status(StatusCode::NOT_FOUND)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let message = e.to_string();
        match e {
            EngineError::EmptyPrompt => ApiError::invalid("prompt", message),
            EngineError::PromptTooLong { .. } => {
                ApiError::invalid("messages", message).with_code("context_length_exceeded")
            }
            EngineError::Sampling(quarry_engine::SamplingError::InvalidParameter {
                name, ..
            }) => ApiError::invalid(name, message),
            EngineError::InvalidArgument { name, .. } => ApiError::invalid(name, message),
            EngineError::Overloaded { .. } | EngineError::ShuttingDown => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message,
                kind: "server_error",
                param: None,
                code: Some("server_busy"),
            },
            EngineError::Timeout => ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                message,
                kind: "server_error",
                param: None,
                code: Some("timeout"),
            },
            _ => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message,
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn errors_have_openais_shape() {
        let e = ApiError::invalid("max_tokens", "too small").with_code("bad");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "too small", "type": "invalid_request_error",
                             "param": "max_tokens", "code": "bad"}})
        );
        assert_eq!(
            ApiError::not_found("gone").body()["error"]["param"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let busy = ApiError::from(EngineError::Overloaded {
            waited: Duration::from_secs(60),
        });
        assert_eq!(
            (busy.status, busy.kind),
            (StatusCode::SERVICE_UNAVAILABLE, "server_error")
        );
        assert_eq!(
            ApiError::from(EngineError::Timeout).status,
            StatusCode::GATEWAY_TIMEOUT
        );
        let long = ApiError::from(EngineError::PromptTooLong {
            tokens: 9,
            context: 8,
        });
        assert_eq!(
            (long.status, long.code),
            (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
        );
    }
}
