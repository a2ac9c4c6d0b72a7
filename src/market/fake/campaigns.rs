//! The fake's `GET /v2/campaigns/{campaignId}` (`getCampaign` in
//! `campaigns.openapi.yaml`): the campaigns it knows are
//! `FakeConfig::campaigns` (campaign id → business id); any other answers
//! 404. Its own hourly window and headers come from the shared `serve`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{api_error, lock, serve, FakeMethod, FakeState, Parsed};
use crate::store::ApiErrorEntry;

pub(super) async fn get_campaign(
    state: web::Data<FakeState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    serve(
        state,
        req,
        FakeMethod::GetCampaign,
        &path,
        &body,
        |_, body| {
            if body.is_empty() {
                Ok(Parsed::default())
            } else {
                Err("GET /v2/campaigns/{campaignId} takes no body".into())
            }
        },
    )
    .await
}

/// The answer for a campaign that passed every check.
pub(super) fn find_campaign(
    state: &FakeState,
    campaign: i64,
) -> Result<Value, (u16, Vec<ApiErrorEntry>)> {
    let business = lock(&state.config)
        .campaigns
        .get(&campaign.to_string())
        .copied();
    match business {
        Some(business) => Ok(json!({
            "campaign": {
                "id": campaign,
                "domain": format!("shop-{campaign}"),
                "business": {"id": business, "name": format!("Business {business}")},
                "placementType": "FBS",
                "apiAvailability": "AVAILABLE"
            }
        })),
        None => Err(api_error(404, "NOT_FOUND", "campaign not found")),
    }
}
