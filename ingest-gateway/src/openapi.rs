//! The gateway's OpenAPI 3.1 document, served at `GET /openapi.json`, generated from the code
//! with utoipa: each handler carries a `#[utoipa::path]` annotation (its path, parameters,
//! body and its own responses), and the router is built from those annotated handlers
//! (`utoipa_axum::routes!`), so a route cannot be served without being in the document.
//!
//! What every operation shares is added here once, by [`finish`], rather than repeated in
//! each annotation: the API-key security requirement and the answers of the auth and rate-limit
//! middleware (401, 429 with `Retry-After`, the `X-RateLimit-*` headers) for every operation
//! not tagged `public`; the request id header and the JSON error shape ([`ErrorBody`]) for 400,
//! 500 and 503 on every operation. So adding a route is one annotation plus its `routes!` line,
//! and adding a query parameter is one field of the route's `IntoParams` struct.

use crate::error::REQUEST_ID_HEADER;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder, Type};

/// The tag of the routes that need no API key (the probes and the document).
pub(crate) const PUBLIC: &str = "public";
/// The security schemes' names in the document.
const API_KEY: &str = "api_key";
const BEARER: &str = "bearer";

/// The body of every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `unauthorized`, `not_found`, `too_large`,
    /// `unsupported_media_type`, `body_timeout`, `rate_limited`, `quota_exceeded`, `busy`,
    /// `unavailable`, `internal`...
    pub error: String,
    /// What went wrong and what to do about it.
    pub message: String,
    /// On 5xx only: the id under which the detail was logged (also in `x-request-id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The document's frame: title, version, the schemas the annotations refer to.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "txpipe ingest gateway",
        description = "Upload CSV files of transactions, follow their processing, read the stored rows. \
                       Every operation but the probes and this document needs an API key \
                       (`x-api-key` or `Authorization: Bearer`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    // schemas only a parameter refers to are not collected from the annotations
    components(schemas(ErrorBody, crate::verdicts::Until))
)]
pub(crate) struct ApiDoc;

/// Adds what every operation shares (see the module header), once every route's paths are in.
pub(crate) fn finish(api: &mut OpenApi) {
    {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                txpipe_common::auth::KEY_HEADER,
                "An API key (`txpipe keys create NAME`)",
            ))),
        );
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The same API key, as `Authorization: Bearer KEY`"))
                    .build(),
            ),
        );
        for item in api.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                let keyed = !op.tags.as_ref().is_some_and(|t| t.iter().any(|t| t == PUBLIC));
                add_common(op, keyed);
            }
        }
    }
}

fn header(description: &str, integer: bool) -> utoipa::openapi::header::Header {
    let ty = if integer { Type::Integer } else { Type::String };
    HeaderBuilder::new().schema(Some(ObjectBuilder::new().schema_type(ty))).description(Some(description)).build()
}

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
}

fn add_common(op: &mut Operation, keyed: bool) {
    let responses = &mut op.responses.responses;
    let mut add = |code: &str, response: ResponseBuilder| {
        responses.entry(code.to_owned()).or_insert_with(|| RefOr::T(response.build()));
    };
    add("400", error_response("The request is malformed (a parameter, header or body): the message says which"));
    add("500", error_response("An internal error; the detail is logged under the request id"));
    if keyed {
        add("401", error_response("No API key, or an unknown or revoked one (`unauthorized`)"));
        add(
            "429",
            error_response("Over the key's request rate (`rate_limited`) or daily upload quota (`quota_exceeded`)")
                .header("Retry-After", header("Seconds until a request is allowed again", true)),
        );
        add(
            "503",
            error_response("Storage or the broker is unavailable, or the gateway is busy: retry later")
                .header("Retry-After", header("Seconds to wait before retrying", true)),
        );
    }
    for response in responses.values_mut() {
        let RefOr::T(response) = response else { continue };
        add_header(response, REQUEST_ID_HEADER, header("The request's id, as in the gateway's logs", false));
        if keyed {
            add_header(response, "X-RateLimit-Limit", header("The key's burst: requests allowed at once", true));
            add_header(response, "X-RateLimit-Remaining", header("Requests allowed right now", true));
            add_header(response, "X-RateLimit-Reset", header("Seconds until the bucket is full again", true));
        }
    }
    if keyed {
        let schemes = [API_KEY, BEARER];
        op.security = Some(schemes.iter().map(|s| SecurityRequirement::new(*s, Vec::<String>::new())).collect());
    }
}

fn add_header(response: &mut Response, name: &str, h: utoipa::openapi::header::Header) {
    response.headers.entry(name.to_owned()).or_insert(RefOr::T(h));
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = serde_json::to_value(crate::openapi(true)).unwrap();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.iter().any(|r| r.ends_with("/Until")), "the test sees parameters' references");
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
            assert!(doc["components"]["schemas"][name].is_object(), "{r} is not in the document");
        }
    }

    #[test]
    fn every_keyed_operation_needs_a_key_and_every_error_has_the_one_shape() {
        let doc = serde_json::to_value(crate::openapi(true)).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["components"]["securitySchemes"]["api_key"]["name"], "x-api-key");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let public = op["tags"].as_array().unwrap().iter().any(|t| t == super::PUBLIC);
                assert_eq!(op["security"].is_array(), !public, "{method} {path}");
                for (code, response) in op["responses"].as_object().unwrap() {
                    let schema = &response["content"]["application/json"]["schema"];
                    let error_body = Value::from("#/components/schemas/ErrorBody");
                    if path == "/upload" && code == "422" {
                        // an invalid file's status record (Prefer: wait), or an error
                        let name = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next()).unwrap_or("");
                        let schema = &doc["components"]["schemas"][name];
                        let one_of = schema["oneOf"].as_array().expect("422 of /upload is one of two");
                        assert!(one_of.iter().any(|s| s["$ref"] == error_body), "{schema}");
                        assert!(one_of.iter().any(|s| s["$ref"] == "#/components/schemas/StatusRecord"), "{schema}");
                    } else if code.starts_with('4') || code.starts_with('5') && !(public && path == "/readyz") {
                        assert_eq!(schema["$ref"], error_body, "{method} {path} {code}");
                    }
                }
            }
        }
    }
}
