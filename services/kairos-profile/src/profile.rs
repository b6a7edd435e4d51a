//! The customer profile kept per customer.

use std::collections::BTreeMap;

use kairos_core::contracts::{Channel, CustomerEvent, EventType, LineItem};
use kairos_core::time::Millis;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerProfile {
    pub customer_id: String,
    pub first_seen_at: Millis,
    pub last_seen_at: Millis,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub push_token: Option<String>,
    pub messenger_id: Option<String>,
    pub time_zone: Option<String>,
    pub birthday: Option<String>,
    pub registered_at: Option<Millis>,
    /// Marketing consent per channel, as last stated by the customer.
    pub consents: BTreeMap<Channel, bool>,
    pub orders: u32,
    pub offline_orders: u32,
    pub revenue: f64,
    pub returns: u32,
    pub first_purchase_at: Option<Millis>,
    pub last_purchase_at: Option<Millis>,
    pub cart: Vec<LineItem>,
    pub cart_updated_at: Option<Millis>,
}

impl CustomerProfile {
    pub fn new(customer_id: &str, at: Millis) -> Self {
        CustomerProfile {
            customer_id: customer_id.to_string(),
            first_seen_at: at,
            last_seen_at: at,
            ..Default::default()
        }
    }

    /// Contacts, consent and recency carried by any event.
    pub fn touch(&mut self, e: &CustomerEvent) {
        self.last_seen_at = self.last_seen_at.max(e.occurred_at);
        if let Some(email) = &e.email {
            self.email = Some(email.clone());
        }
        if let Some(phone) = &e.phone {
            self.phone = Some(phone.clone());
        }
        if let Some(c) = &e.consent {
            self.consents.insert(c.channel, c.granted);
        }
        if let Some(u) = &e.profile {
            let set = |field: &mut Option<String>, v: &Option<String>| {
                if let Some(v) = v {
                    *field = Some(v.clone());
                }
            };
            set(&mut self.first_name, &u.first_name);
            set(&mut self.last_name, &u.last_name);
            set(&mut self.email, &u.email);
            set(&mut self.phone, &u.phone);
            set(&mut self.push_token, &u.push_token);
            set(&mut self.messenger_id, &u.messenger_id);
            set(&mut self.time_zone, &u.time_zone);
            set(&mut self.birthday, &u.birthday);
        }
    }

    pub fn update_cart(&mut self, e: &CustomerEvent) {
        let items: Vec<LineItem> = if e.items.is_empty() {
            e.product
                .iter()
                .map(|p| LineItem {
                    product_id: p.product_id.clone(),
                    name: p.name.clone(),
                    category: p.category.clone(),
                    quantity: 1,
                    unit_price: p.price.unwrap_or(0.0),
                })
                .collect()
        } else {
            e.items.clone()
        };
        for item in items {
            let existing = self
                .cart
                .iter()
                .position(|c| c.product_id == item.product_id);
            match (e.event_type, existing) {
                (EventType::add_to_cart, Some(i)) => self.cart[i].quantity += item.quantity,
                (EventType::add_to_cart, None) => self.cart.push(item),
                (EventType::remove_from_cart, Some(i)) => {
                    self.cart[i].quantity -= item.quantity;
                    if self.cart[i].quantity <= 0 {
                        self.cart.remove(i);
                    }
                }
                _ => {}
            }
        }
        self.cart_updated_at = Some(e.occurred_at);
    }

    pub fn record_purchase(&mut self, at: Millis, total: f64, offline: bool) {
        self.orders += 1;
        if offline {
            self.offline_orders += 1;
        }
        self.revenue += total;
        self.first_purchase_at.get_or_insert(at);
        self.last_purchase_at = Some(self.last_purchase_at.map_or(at, |l| l.max(at)));
        self.cart.clear();
    }

    pub fn record_return(&mut self, total: f64) {
        self.returns += 1;
        self.revenue -= total;
    }

    pub fn cart_value(&self) -> f64 {
        self.cart
            .iter()
            .map(|i| i.unit_price * f64::from(i.quantity))
            .sum()
    }

    /// Variables a template may use.
    pub fn template_variables(&self) -> serde_json::Value {
        serde_json::json!({
            "customer_id": self.customer_id,
            "first_name": self.first_name,
            "cart_items": self.cart,
            "cart_value": (self.cart_value() * 100.0).round() / 100.0,
            "orders": self.orders,
        })
    }
}
