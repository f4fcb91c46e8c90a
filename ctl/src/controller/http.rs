//! Routes and handlers of the controller's HTTP/JSON API. Handlers only
//! translate between HTTP and [`Cluster`](super::cluster::Cluster) calls.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::cluster::JobError;
use super::scale::AddError;
use super::{nodeops, Shared};
use crate::api::{
    CoresResponse, DeregisterResponse, ErrorBody, EventsResponse, HeartbeatReply, JobEntry, JobsResponse,
    NodeEntry, NodeReport, NodeState, NodesResponse, RegisterJobRequest, ScaleRequest, ScaleResponse,
    SetCoresRequest, StatusResponse, TiersResponse,
};
use crate::provision::ProvisionedNode;

/// Events one `GET /v1/events` returns at most.
const MAX_EVENTS_PER_REPLY: usize = 1000;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.max_body;
    Router::new()
        .route("/v1/nodes/heartbeat", post(heartbeat))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{node_id}", get(node))
        .route("/v1/cores", get(cores))
        .route("/v1/tiers", get(tiers))
        .route("/v1/jobs", get(jobs).post(register_job))
        .route("/v1/jobs/{name}", get(job).delete(deregister_job))
        .route("/v1/jobs/{name}/token", post(job_token))
        .route("/v1/events", get(events))
        .route("/v1/scale", post(scale))
        .route("/v1/nodes/{node_id}/drain", post(drain))
        .route("/v1/nodes/{node_id}/cores", post(set_cores))
        .route("/v1/provisioner", get(provisioner))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), require_token))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// An error reply: a status code and an [`ErrorBody`].
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// A request body for a JSON route: refused with 413 before it is read when
/// its declared length is over the limit, with 415 when it is declared as
/// something other than JSON, and cut off at the limit otherwise
/// (`DefaultBodyLimit`).
struct JsonBytes(Bytes);

impl FromRequest<Arc<Shared>> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<Shared>) -> Result<Self, ApiError> {
        let headers = req.headers();
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > state.max_body as u64) {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body of {} bytes is over the limit of {}", declared.unwrap_or(0), state.max_body),
            ));
        }
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            let is_json = ct
                .to_str()
                .ok()
                .and_then(|v| v.split(';').next())
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
            if !is_json {
                return Err(ApiError(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "body must be application/json".into(),
                ));
            }
        }
        Bytes::from_request(req, state).await.map(JsonBytes).map_err(|r| ApiError(r.status(), r.body_text()))
    }
}

async fn heartbeat(
    State(s): State<Arc<Shared>>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let report: NodeReport = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid node report: {e}")))?;
    let node_id = report.node_id.clone();
    let mut c = s.cluster();
    // State changes become events inside `heartbeat`.
    c.heartbeat(report, Instant::now()).map_err(|e| match e {
        super::cluster::ReportError::TooManyNodes(_) => {
            ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        e => ApiError(StatusCode::BAD_REQUEST, format!("invalid node report: {e}")),
    })?;
    let mut commands = c.take_commands(&node_id);
    commands.extend(c.view_commands(&node_id));
    let reply = HeartbeatReply {
        commands,
        node_id,
        heartbeat_ms: c.heartbeat_interval().as_millis() as u64,
        missed_heartbeats: c.missed_heartbeats(),
    };
    drop(c);
    s.accepted.send_modify(|n| *n += 1);
    Ok(Json(reply))
}

async fn status(State(s): State<Arc<Shared>>) -> Json<StatusResponse> {
    Json(s.status())
}

async fn nodes(State(s): State<Arc<Shared>>) -> Json<NodesResponse> {
    Json(s.read(|c, now| c.nodes(now)))
}

async fn node(
    State(s): State<Arc<Shared>>,
    Path(node_id): Path<String>,
) -> Result<Json<NodeEntry>, ApiError> {
    s.read(|c, now| c.node(&node_id, now))
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no node `{node_id}`")))
}

async fn cores(State(s): State<Arc<Shared>>) -> Json<CoresResponse> {
    Json(s.read(|c, _| c.cores()))
}

async fn tiers(State(s): State<Arc<Shared>>) -> Json<TiersResponse> {
    Json(s.read(|c, _| c.tiers()))
}

async fn jobs(State(s): State<Arc<Shared>>) -> Json<JobsResponse> {
    Json(s.read(|c, _| c.jobs()))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}

async fn job(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Json<JobEntry>, ApiError> {
    s.read(|c, _| c.job(&name))
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job `{name}`")))
}

fn job_error(e: JobError) -> ApiError {
    let code = match e {
        JobError::BadName | JobError::BadHints(_) => StatusCode::BAD_REQUEST,
        JobError::Exists(_) => StatusCode::CONFLICT,
        JobError::NotFound(_) => StatusCode::NOT_FOUND,
        JobError::NoNodes | JobError::NoMetadataNode | JobError::TooMany => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError(code, e.to_string())
}

/// Runs a handler's work in a task of its own: hyper drops a handler's
/// future when its client goes away, which would leave a job planned but
/// never committed or aborted (or removed but never deregistered).
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("request task failed: {e}")))?
}

/// Allocates and packs the job, then registers it on the node chosen for
/// its namespace; the job is visible once that node has it.
async fn register_job(
    State(s): State<Arc<Shared>>,
    JsonBytes(body): JsonBytes,
) -> Result<(StatusCode, Json<JobEntry>), ApiError> {
    detached(register_job_now(s, body)).await
}

async fn register_job_now(s: Arc<Shared>, body: Bytes) -> Result<(StatusCode, Json<JobEntry>), ApiError> {
    let req: RegisterJobRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid job registration: {e}")))?;
    let name = req.name;
    let plan_now = |s: &Shared| {
        let mut c = s.cluster();
        c.sweep(Instant::now());
        let plan = c.plan_job(&name, req.hints.clone()).map_err(job_error)?;
        let entry = c
            .job_record(&name)
            .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "job vanished".into()))?;
        Ok::<_, ApiError>((plan, nodeops::node_hints(&entry.hints, &entry.alloc)))
    };
    let (mut plan, mut node_hints) = plan_now(&s)?;
    if plan.extra_nodes > 0 && s.provisioner.is_some() {
        // The job cannot share the live nodes: start more and wait for them.
        s.cluster().unplan_job(&name);
        let _one_at_a_time = s.scaling.lock().await;
        let why = format!("job {name} does not fit on the live nodes");
        match s.add_nodes(plan.extra_nodes, &why).await {
            Ok(_) => {}
            Err(AddError::Timeout(e)) => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("registering {name}: waited for {} new node(s): {e}", plan.extra_nodes),
                ))
            }
            // No room to add nodes: the job is overcommitted on the live ones (an event says why).
            Err(AddError::NoRoom(_)) => {}
        }
        (plan, node_hints) = plan_now(&s)?;
    }
    let (addr, job_name) = (plan.node_addr.clone(), name.clone());
    let secret = s.cluster_secret.clone();
    let done =
        tokio::task::spawn_blocking(move || nodeops::register(&addr, &job_name, node_hints, secret.as_ref()))
            .await;
    let outcome = match done {
        Ok(r) => r,
        Err(e) => Err(format!("registration task failed: {e}")),
    };
    let mut c = s.cluster();
    match outcome {
        Ok(owner) => {
            let mut entry = c
                .commit_job(&name)
                .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "job vanished".into()))?;
            drop(c);
            with_token(&s, &mut entry, owner)?;
            Ok((StatusCode::CREATED, Json(entry)))
        }
        Err(why) => {
            c.abort_job(&name, &why);
            Err(ApiError(StatusCode::BAD_GATEWAY, why))
        }
    }
}

/// Forgets the job and deregisters it on its node, which frees its blocks
/// except PERSIST objects. A job only a node knows (registered directly) is
/// deregistered there too.
async fn deregister_job(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<DeregisterResponse>, ApiError> {
    detached(deregister_job_now(s, name)).await
}

async fn deregister_job_now(s: Arc<Shared>, name: String) -> Result<Json<DeregisterResponse>, ApiError> {
    let (node_id, addr, up, nodes) = {
        let mut c = s.cluster();
        c.sweep(Instant::now());
        let entry =
            c.job(&name).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
        c.remove_job(&name);
        (entry.node_id, entry.node_addr, entry.node_state == Some(NodeState::Up), c.node_addrs())
    };
    let mut owed = Vec::new();
    let (freed, note) = if !up || addr.is_empty() {
        let note = format!(
            "node {node_id} is down: its blocks of the job were not freed; it is deregistered there when the node is up"
        );
        s.cluster().owe_deregistration(&name, &node_id, "its node is down");
        (false, Some(note))
    } else {
        let job_name = name.clone();
        let secret = s.cluster_secret.clone();
        let asked: BTreeSet<u16> = nodes.keys().copied().collect();
        let done = tokio::task::spawn_blocking(move || {
            nodeops::deregister(&addr, &job_name, &nodes, secret.as_ref())
        })
        .await;
        match done {
            Ok(Ok(Some(d))) => {
                owed = s.cluster().owe_frees(&name, &d, &asked);
                (true, None)
            }
            Ok(Ok(None)) => (false, Some(format!("node {node_id} did not know the job"))),
            Ok(Err(e)) => {
                s.cluster().owe_deregistration(&name, &node_id, &e);
                (false, Some(format!("{e}; it is deregistered there when the node answers")))
            }
            Err(e) => {
                let e = format!("deregistration task failed: {e}");
                s.cluster().owe_deregistration(&name, &node_id, &e);
                (false, Some(e))
            }
        }
    };
    let outcome = match &note {
        None if owed.is_empty() => {
            format!("blocks freed on {node_id} and every live node (PERSIST objects kept)")
        }
        None => format!(
            "blocks freed on {node_id} and every live node (PERSIST objects kept); owed to node(s) {owed:?}"
        ),
        Some(n) => n.clone(),
    };
    s.cluster().record_deregistered(&name, &node_id, &outcome);
    Ok(Json(DeregisterResponse { name, node_id, freed, note, owed }))
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(s): State<Arc<Shared>>, Query(q): Query<EventsQuery>) -> Json<EventsResponse> {
    let limit = q.limit.unwrap_or(MAX_EVENTS_PER_REPLY).min(MAX_EVENTS_PER_REPLY);
    Json(s.read(|c, _| c.events(q.since.unwrap_or(0), limit)))
}

async fn scale(
    State(s): State<Arc<Shared>>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<ScaleResponse>, ApiError> {
    let req: ScaleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid scale request: {e}")))?;
    if s.provisioner.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this controller has no provisioner (`pollen up --nodes N` runs one)".into(),
        ));
    }
    s.scale_to(req.nodes).await.map(Json).map_err(|e| ApiError(StatusCode::CONFLICT, e))
}

async fn drain(
    State(s): State<Arc<Shared>>,
    Path(node_id): Path<String>,
) -> Result<Json<ScaleResponse>, ApiError> {
    let _one_at_a_time = s.scaling.lock().await;
    s.drain(&node_id, "asked by an operator").map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    let open_nodes = s.cluster().open_nodes().len();
    Ok(Json(ScaleResponse { started: vec![], draining: vec![node_id], open_nodes }))
}

async fn provisioner(State(s): State<Arc<Shared>>) -> Json<Vec<ProvisionedNode>> {
    Json(s.provisioner.as_ref().map(|p| p.list()).unwrap_or_default())
}

/// Queues a polling-cores command for the node's next heartbeat reply.
async fn set_cores(
    State(s): State<Arc<Shared>>,
    Path(node_id): Path<String>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<NodeEntry>, ApiError> {
    let req: SetCoresRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid cores request: {e}")))?;
    let mut c = s.cluster();
    let now = Instant::now();
    c.sweep(now);
    if c.state(&node_id).is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no node `{node_id}`")));
    }
    c.set_polling_cores(&node_id, req.cores, "asked by an operator")
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    c.node(&node_id, now)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no node `{node_id}`")))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let text = s
        .read(super::metrics::render)
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed".into()))?;
    Ok(([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response())
}

/// Refuses a request without the admin token, when one is configured.
async fn require_token(State(s): State<Arc<Shared>>, req: Request, next: axum::middleware::Next) -> Response {
    if let Some(token) = &s.admin_token {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if !crate::auth::authorized(given, token) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "this controller needs its admin token (Authorization: Bearer TOKEN; pollenctl: --admin-token-file, $POLLEN_ADMIN_TOKEN)".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Adds a fresh read-write capability token for the job, whose blocks
/// `owner` holds, when the cluster has a secret.
fn with_token(s: &Shared, entry: &mut JobEntry, owner: dataplane::auth::BlockOwner) -> Result<(), ApiError> {
    if let Some(secret) = &s.cluster_secret {
        let rw = dataplane::auth::Rights::READ_WRITE;
        let (t, expiry) = nodeops::mint(secret, &entry.name, Some(owner), rw, s.token_ttl)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
        entry.token = Some(t);
        entry.token_expiry_unix = Some(expiry);
    }
    Ok(())
}

/// A job with a fresh capability token (the API's admin token guards it);
/// `409` when the cluster has no secret (nodes accept any request then).
async fn job_token(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<JobEntry>, ApiError> {
    if s.cluster_secret.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this controller has no cluster secret: nodes need no token".into(),
        ));
    }
    let mut entry = s
        .read(|c, _| c.job(&name))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
    // The token claims the job's block owner: its id on its metadata node, asked there.
    let (addr, job_name, secret) = (entry.node_addr.clone(), name.clone(), s.cluster_secret.clone());
    if addr.is_empty() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("job {name}: its metadata node {} is unknown; no token until it is back", entry.node_id),
        ));
    }
    let owner = tokio::task::spawn_blocking(move || nodeops::block_owner(&addr, &job_name, secret.as_ref()))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("token task failed: {e}")))?
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, format!("minting a token for {name}: {e}")))?;
    with_token(&s, &mut entry, owner)?;
    Ok(Json(entry))
}
