//! `GET /v1/models` and `GET /v1/models/{model}`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::{ModelCard, ModelList};
use crate::error::ApiError;
use crate::state::AppState;

/// The model routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{model}", get(one))
}

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.config().served_model_name.clone(),
        object: "model",
        created: state.created(),
        owned_by: "r4b-serve",
        max_model_len: state.max_model_len(),
    }
}

async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&state)],
    })
}

async fn one(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if model != state.config().served_model_name {
        return Err(ApiError::ModelNotFound(model));
    }
    Ok(Json(card(&state)))
}

/// `model` must be absent or the served name.
pub fn check_model(model: Option<&str>, served: &str) -> Result<(), ApiError> {
    match model {
        Some(m) if m != served => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}
