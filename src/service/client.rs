//! The client side of `org.edgellm.Daemon1`, for the `edgellm` CLI and the tests.

use std::collections::HashMap;

use zbus::zvariant::{OwnedValue, Value};

#[zbus::proxy(interface = "org.edgellm.Daemon1", default_service = "org.edgellm.Daemon1", default_path = "/org/edgellm/Daemon1")]
pub trait Daemon1 {
    fn generate(&self, model: &str, prompt: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<u64>;
    fn chat(&self, model: &str, messages: &[(&str, &str)], options: HashMap<&str, Value<'_>>) -> zbus::Result<u64>;
    fn complete(&self, model: &str, prompt: &str, options: HashMap<&str, Value<'_>>)
        -> zbus::Result<(String, HashMap<String, OwnedValue>)>;
    fn cancel(&self, request_id: u64) -> zbus::Result<()>;
    fn tokenize(&self, model: &str, text: &str) -> zbus::Result<Vec<u32>>;
    fn detokenize(&self, model: &str, ids: &[u32]) -> zbus::Result<String>;
    fn list_models(&self) -> zbus::Result<Vec<(String, HashMap<String, OwnedValue>)>>;
    fn load_model(&self, name: &str) -> zbus::Result<()>;
    fn unload_model(&self, name: &str) -> zbus::Result<()>;
    fn status(&self) -> zbus::Result<HashMap<String, OwnedValue>>;
    fn create_session(&self, model: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
    fn close_session(&self, session: &zbus::zvariant::ObjectPath<'_>) -> zbus::Result<()>;
    #[zbus(signal)]
    fn token(&self, request_id: u64, text: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn finished(&self, request_id: u64, reason: String, stats: HashMap<String, OwnedValue>) -> zbus::Result<()>;
    #[zbus(signal)]
    fn model_state_changed(&self, name: String, state: String) -> zbus::Result<()>;
}

/// Which bus a client of the daemon talks to.
#[derive(Debug, Clone)]
pub enum Bus {
    Session,
    System,
    /// A D-Bus address, e.g. `unix:path=/run/edgellm/bus`.
    Address(String),
}

impl Bus {
    pub async fn connect(&self) -> zbus::Result<zbus::Connection> {
        match self {
            Bus::Address(address) => zbus::connection::Builder::address(address.as_str())?.build().await,
            Bus::System => zbus::Connection::system().await,
            Bus::Session => zbus::Connection::session().await,
        }
    }
}
