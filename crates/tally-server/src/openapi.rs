//! The OpenAPI document, generated from the handlers, and the browsable docs
//! (Swagger UI, vendored into the binary: no CDN).

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::routes::{
    customers, events, ledger, members, notify, plans, pricebook, spend, system, topups,
};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("API key")
                    .build(),
            ),
        );
    }
}

/// Every route that takes a key may answer 401 (no key, or a bad one) and 403
/// (a key without the route's scope), with the usual error body.
struct AuthResponses;

impl Modify for AuthResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
        let header = |kind: Type, description: &str| {
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(kind))
                .description(Some(description))
                .build()
        };
        let answer = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            // Writes whose answer may be an earlier one replayed: those that
            // take an id. Not a quote or a simulation (they write nothing),
            // a clock step (a step each time), a batch of events (each
            // event says `duplicate` instead), the settings a PUT or PATCH
            // sets again (the same answer anyway) or a DELETE.
            let reads_only = path == "/v1/quotes" || path.ends_with("/simulate");
            let post_replays =
                !reads_only && !["/v1/clock/advance", "/v1/events"].contains(&path.as_str());
            let put_replays = path.ends_with("/subscription");
            // (whether the method writes, whether it replays, the operation)
            let operations = [
                (false, false, &mut item.get),
                (true, put_replays, &mut item.put),
                (true, post_replays, &mut item.post),
                // (No DELETE takes an id of its own.)
                (true, false, &mut item.delete),
                (true, false, &mut item.patch),
            ];
            for (writes, replayable, operation) in operations {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                if operation.security.as_ref().is_none_or(|s| s.is_empty()) {
                    continue;
                }
                let takes_input = operation.request_body.is_some()
                    || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let responses = &mut operation.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| answer("no key, or not a valid one").into());
                responses.entry("403".into()).or_insert_with(|| {
                    answer("the key lacks the scope this operation's security names").into()
                });
                if takes_input {
                    responses.entry("400".into()).or_insert_with(|| {
                        answer("bad input (`param` names the field): nothing changed").into()
                    });
                }
                if writes {
                    responses.entry("503".into()).or_insert_with(|| {
                        let mut unavailable = answer(
                            "`overloaded` (too many writes in flight) or `unavailable` (the store, \
                             or no server runs the writer): nothing is lost, retry with the same \
                             id after `Retry-After` seconds",
                        );
                        unavailable.headers.insert(
                            "Retry-After".into(),
                            header(
                                Type::Integer,
                                "seconds to wait before retrying with the same id",
                            ),
                        );
                        unavailable.into()
                    });
                    // A write's answer may be the first answer to its id, replayed.
                    for (status, response) in responses.iter_mut() {
                        if !status.starts_with('2') || !replayable {
                            continue;
                        }
                        if let utoipa::openapi::RefOr::T(response) = response {
                            response.headers.insert(
                                "Idempotent-Replayed".into(),
                                header(
                                    Type::String,
                                    "`true` when this answer is the first answer to this id, \
                                     replayed: nothing was applied again",
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The document's own routes, which the Swagger UI serves: `/openapi.json`
/// and `/docs/` (`/docs` redirects there).
struct DocsPaths;

/// Routes whose body may be left out (every field has a default): their
/// request body is not required.
struct OptionalBodies;

const OPTIONAL_BODIES: [&str; 5] = [
    "/v1/holds/{id}/capture",
    "/v1/holds/{id}/release",
    "/v1/topups/{id}/confirm",
    "/v1/dead-letters/{id}/discard",
    "/v1/pricebooks/{id}/publish",
];

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::Required;
        for path in OPTIONAL_BODIES {
            let item = openapi
                .paths
                .paths
                .get_mut(path)
                .unwrap_or_else(|| panic!("{path} is in the OpenAPI document"));
            let body = item
                .post
                .as_mut()
                .and_then(|operation| operation.request_body.as_mut())
                .unwrap_or_else(|| panic!("POST {path} has a request body"));
            body.required = Some(Required::False);
        }
    }
}

impl Modify for DocsPaths {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
        use utoipa::openapi::{ContentBuilder, ResponseBuilder};
        let page = |summary: &str, id: &str, what: &str, media: &str| {
            let operation = OperationBuilder::new()
                .summary(Some(summary))
                .operation_id(Some(id))
                .tag("system")
                .response(
                    "200",
                    ResponseBuilder::new()
                        .description(what)
                        .content(media, ContentBuilder::new().build())
                        .build(),
                )
                .build();
            PathItem::new(HttpMethod::Get, operation)
        };
        openapi.paths.paths.insert(
            "/openapi.json".into(),
            page(
                "This OpenAPI document",
                "openapi_document",
                "the document (no key needed)",
                "application/json",
            ),
        );
        openapi.paths.paths.insert(
            "/docs/".into(),
            page(
                "Browsable API documentation (Swagger UI)",
                "docs",
                "the page (no key needed)",
                "text/html",
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally", description = "The credits engine: grants, charges, holds, refunds, expiry, the ledger and the price book. \
        Amounts are decimal strings with at most 6 fractional digits. Every create or state change carries a \
        client-chosen id that is its idempotency key forever: a retry returns the original result with \
        `Idempotent-Replayed: true`; the same id with other content is 409 `idempotency_conflict`. \
        Keys have a scope, which each operation's security names: `read`; `write` (includes read); \
        `admin` (includes write); `ingest` (usage events only: `POST /v1/events`, which write and admin \
        keys may call too). A method a route does not have is 405 `method_not_allowed` with `Allow`; a body that pauses \
        longer than the server's read timeout (30 s by default) is 408 `request_timeout`."),
    paths(
        system::healthz, system::metrics, system::clock, system::advance_clock, system::create_api_key, system::list_api_keys, system::revoke_api_key,
        customers::create_customer, customers::get_customer, customers::update_customer, customers::balance, customers::set_overage, customers::clear_overage, customers::create_grant,
        customers::list_grants, customers::void_grant, customers::change_expiry,
        spend::create_charge, spend::create_hold, spend::get_hold, spend::capture_hold, spend::release_hold,
        spend::create_refund, ledger::customer_ledger, ledger::customer_usage, ledger::get_entry,
        pricebook::put_feature, pricebook::list_features, pricebook::create_pricebook, pricebook::list_pricebooks,
        pricebook::get_pricebook, pricebook::put_rules, pricebook::publish, pricebook::diff_pricebooks,
        pricebook::simulate, pricebook::put_contract, pricebook::get_contract, pricebook::list_contracts, pricebook::create_quote,
        events::post_events, events::pubsub_push, events::list_dead_letters, events::get_dead_letter,
        events::replay_dead_letter, events::discard_dead_letter,
        plans::put_plan, plans::get_plan, plans::list_plans, plans::put_subscription, plans::get_subscription,
        plans::cancel_subscription,
        notify::put_alerts, notify::get_alerts, notify::create_webhook_endpoint, notify::list_webhook_endpoints,
        notify::get_webhook_endpoint, notify::update_webhook_endpoint, notify::delete_webhook_endpoint,
        notify::rotate_webhook_secret,
        notify::list_deliveries, notify::stream, members::put_member, members::list_members,
        members::create_transfer,
        topups::put_credit_pack, topups::get_credit_pack, topups::list_credit_packs, topups::create_topup, topups::list_topups,
        topups::get_topup, topups::confirm_topup, topups::fail_topup, topups::put_auto_topup,
        topups::get_auto_topup,
    ),
    modifiers(&BearerAuth, &AuthResponses, &DocsPaths, &OptionalBodies),
    tags(
        (name = "customers"), (name = "grants"), (name = "charges"), (name = "holds"), (name = "refunds"),
        (name = "ledger"), (name = "price book"), (name = "events"), (name = "plans"), (name = "notifications"), (name = "members"), (name = "top-ups"), (name = "system"),
    )
)]
pub struct ApiDoc;

/// `/openapi.json` and `/docs`.
pub fn docs() -> Router {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
