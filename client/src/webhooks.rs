//! Webhooks, event types, events and their deliveries through a relay's API.
//! Unlike the activity log these have no offline reading from the data
//! directory: the dispatcher that queues and sends deliveries runs in the
//! relay, so every call needs a running one.

use ferry_common::api::{
    DeliveryPage, DeliveryView, EventAccepted, EventInput, EventTypeList, Recovered,
    TestEventInput, WebhookInput, WebhookList, WebhookView,
};
use hyper::Method;
use serde::Serialize;

use crate::activity::{encode, LogError, Source};

/// Which deliveries of a webhook to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryQuery {
    /// Only `pending`, `succeeded` or `failed` ones.
    pub state: Option<String>,
    /// Only those older than this cursor (a page's `next_cursor`).
    pub before: Option<String>,
    /// At most this many; the relay's default when `None`.
    pub limit: Option<u32>,
}

impl DeliveryQuery {
    /// The query string, empty or starting with `?`.
    fn to_query(&self) -> String {
        let limit = self.limit.map(|limit| limit.to_string());
        let pairs = [
            ("state", self.state.as_ref()),
            ("before", self.before.as_ref()),
            ("limit", limit.as_ref()),
        ];
        let query: Vec<String> = pairs
            .iter()
            .filter_map(|(key, value)| value.map(|v| format!("{key}={}", encode(v))))
            .collect();
        if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        }
    }
}

/// `value` as a request body.
fn body(value: &impl Serialize) -> Result<Option<String>, LogError> {
    serde_json::to_string(value)
        .map(Some)
        .map_err(|err| LogError::Invalid(err.to_string()))
}

/// The body of the POSTs that take no input.
fn empty() -> Option<String> {
    Some("{}".to_owned())
}

impl Source {
    /// The caller's webhooks, oldest first.
    pub async fn webhooks(&self) -> Result<WebhookList, LogError> {
        self.call_json(Method::GET, "/api/v1/webhooks", None).await
    }

    /// Creates a webhook; `input` needs its name, URL and actions.
    pub async fn create_webhook(&self, input: &WebhookInput) -> Result<WebhookView, LogError> {
        self.call_json(Method::POST, "/api/v1/webhooks", body(input)?)
            .await
    }

    /// Changes the fields `input` holds of webhook `id`.
    pub async fn update_webhook(
        &self,
        id: &str,
        input: &WebhookInput,
    ) -> Result<WebhookView, LogError> {
        self.call_json(Method::PUT, &webhook_path(id, ""), body(input)?)
            .await
    }

    /// Deletes webhook `id`.
    pub async fn delete_webhook(&self, id: &str) -> Result<(), LogError> {
        self.call(Method::DELETE, &webhook_path(id, ""), None)
            .await
            .map(drop)
    }

    /// Gives webhook `id` a new signing secret; the old one signs too for a
    /// while (`previous_secret_until`).
    pub async fn rotate_secret(&self, id: &str) -> Result<WebhookView, LogError> {
        self.call_json(Method::POST, &webhook_path(id, "/rotate-secret"), empty())
            .await
    }

    /// Sends webhook `id` an example event of `input`'s type.
    pub async fn test_webhook(
        &self,
        id: &str,
        input: &TestEventInput,
    ) -> Result<EventAccepted, LogError> {
        self.call_json(Method::POST, &webhook_path(id, "/test"), body(input)?)
            .await
    }

    /// A page of webhook `id`'s deliveries, newest first.
    pub async fn deliveries(
        &self,
        id: &str,
        query: &DeliveryQuery,
    ) -> Result<DeliveryPage, LogError> {
        let path = webhook_path(id, &format!("/deliveries{}", query.to_query()));
        self.call_json(Method::GET, &path, None).await
    }

    /// Queues again webhook `id`'s deliveries that failed since `since` (an
    /// RFC 3339 time, or a duration such as `1h` for an hour ago).
    pub async fn recover(&self, id: &str, since: &str) -> Result<Recovered, LogError> {
        let path = webhook_path(id, &format!("/recover?since={}", encode(since)));
        self.call_json(Method::POST, &path, empty()).await
    }

    /// Sends delivery `id` again, as a new attempt.
    pub async fn resend(&self, id: &str) -> Result<DeliveryView, LogError> {
        let path = format!("/api/v1/deliveries/{}/resend", encode(id));
        self.call_json(Method::POST, &path, empty()).await
    }

    /// The event types the caller may send.
    pub async fn event_types(&self) -> Result<EventTypeList, LogError> {
        self.call_json(Method::GET, "/api/v1/event-types", None)
            .await
    }

    /// Sends an event: a delivery is queued for each enabled webhook that
    /// listens to its type.
    pub async fn send_event(&self, input: &EventInput) -> Result<EventAccepted, LogError> {
        self.call_json(Method::POST, "/api/v1/events", body(input)?)
            .await
    }
}

/// `/api/v1/webhooks/{id}` with `rest` after it.
fn webhook_path(id: &str, rest: &str) -> String {
    format!("/api/v1/webhooks/{}{rest}", encode(id))
}

#[cfg(test)]
mod tests {
    use super::{webhook_path, DeliveryQuery};

    #[test]
    fn delivery_queries_are_encoded_and_leave_out_what_is_unset() {
        assert_eq!(DeliveryQuery::default().to_query(), "");
        let query = DeliveryQuery {
            state: Some("failed".to_owned()),
            before: Some("msg_1/2 3".to_owned()),
            limit: Some(20),
        };
        assert_eq!(
            query.to_query(),
            "?state=failed&before=msg_1%2F2%203&limit=20"
        );
    }

    #[test]
    fn an_id_cannot_reach_another_route() {
        assert_eq!(
            webhook_path("../events?x", "/test"),
            "/api/v1/webhooks/..%2Fevents%3Fx/test"
        );
    }
}
