//! Tokens over gRPC: the `WriteService` and Flight SQL authenticate every call with
//! [`Authenticate`], an interceptor reading the `authorization` metadata (`Bearer`, or
//! `Basic` with the token as password, as Flight's handshake sends it); handlers then
//! check what the call does with [`Authorizer::authorize`]. Health and reflection stay
//! open. Refusals are `UNAUTHENTICATED` (no or a bad token) and `PERMISSION_DENIED` (a
//! token without the right).

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::{Action, AuthError, Authorizer, Door, Principal, token};

/// The token of a call's `authorization` metadata.
pub fn credential(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(token::from_authorization)
}

/// A refusal as a gRPC status.
pub fn status(e: &AuthError) -> Status {
    if e.is_forbidden() {
        Status::permission_denied(e.to_string())
    } else {
        Status::unauthenticated(e.to_string())
    }
}

/// Authenticates every call and leaves its [`Principal`] in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authenticate {
    auth: Arc<Authorizer>,
    door: Door,
}

impl Authenticate {
    pub fn new(auth: Arc<Authorizer>, door: Door) -> Self {
        Self { auth, door }
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let credential = credential(request.metadata());
        let principal = self
            .auth
            .authenticate(self.door, credential.as_deref())
            .map_err(|e| status(&e))?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The principal [`Authenticate`] found for `request`.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not authenticated"))
}

/// `principal` may do `action` on `door`, or the status to answer.
pub fn authorize(
    auth: &Authorizer,
    door: Door,
    principal: &Principal,
    action: Action<'_>,
) -> Result<(), Status> {
    auth.authorize(door, principal, action)
        .map_err(|e| status(&e))
}
