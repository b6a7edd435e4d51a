//! The catalog join: catalog updates meet customer interest, keyed by product.
//!
//! The profile processor publishes each customer's interest in a product (viewed,
//! wishlisted) to `product-interest`, keyed by product id and co-partitioned with
//! `catalog`. This processor keeps, per product, its last price and stock and an
//! index `i/<product>/<customer>` of interested customers. A price drop or a return
//! to stock reads only that product's index (no scan over customers) and publishes a
//! product occasion per interested customer, keyed by customer id, back to the profile
//! processor, which applies consent, scenarios and thresholds.

use std::sync::Arc;

use kairos_core::config::{topics, Config, ScenarioKind};
use kairos_core::contracts::{
    CatalogUpdate, DeadLetterReason, InterestKind, ProductInterest, ProductOccasion,
    ProductOccasionKind,
};
use kairos_core::encoding::{decode_input, decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::schemas;
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY};
use serde::{Deserialize, Serialize};

/// How long a view keeps a customer in a product's audience.
pub const VIEW_INTEREST_DAYS: i64 = 30;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ProductState {
    name: Option<String>,
    price: Option<f64>,
    in_stock: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Interest {
    viewed_at: Option<Millis>,
    wishlisted: bool,
}

pub enum CatalogInput {
    Update(Box<CatalogUpdate>),
    Interest(Box<ProductInterest>),
}

pub struct CatalogJoin {
    registry: SchemaRegistry,
    catalog_topic: String,
    interest_topic: String,
    occasions_topic: String,
    /// Smallest drop any price-drop scenario asks for, in percent.
    min_drop_percent: f64,
    watches_stock: bool,
}

impl CatalogJoin {
    pub fn new(config: &Config, registry: SchemaRegistry) -> Self {
        let enabled = |k| {
            config
                .scenarios
                .iter()
                .filter(move |s| s.enabled && s.kind == k)
        };
        CatalogJoin {
            registry,
            catalog_topic: config.topic(topics::CATALOG),
            interest_topic: config.topic(topics::PRODUCT_INTEREST),
            occasions_topic: config.topic(topics::PRODUCT_OCCASIONS),
            min_drop_percent: enabled(ScenarioKind::PriceDrop)
                .map(|s| s.min_drop_percent.unwrap_or(0.0))
                .fold(f64::INFINITY, f64::min),
            watches_stock: enabled(ScenarioKind::BackInStock).next().is_some(),
        }
    }

    fn apply_update(&mut self, ctx: &mut Ctx<'_>, u: &CatalogUpdate) -> anyhow::Result<()> {
        let key = format!("p/{}", u.product_id);
        let mut product: ProductState = ctx.get(&key)?.unwrap_or_default();
        let mut occasions = Vec::new();
        if let (Some(old), Some(new)) = (product.price, u.price) {
            let drop = if old > 0.0 {
                100.0 * (old - new) / old
            } else {
                0.0
            };
            if new < old && drop >= self.min_drop_percent {
                occasions.push((ProductOccasionKind::price_drop, Some(old), Some(new)));
            }
        }
        if self.watches_stock && product.in_stock == Some(false) && u.in_stock == Some(true) {
            occasions.push((
                ProductOccasionKind::back_in_stock,
                product.price,
                u.price.or(product.price),
            ));
        }
        if u.name.is_some() {
            product.name = u.name.clone();
        }
        if u.price.is_some() {
            product.price = u.price;
        }
        if u.in_stock.is_some() {
            product.in_stock = u.in_stock;
        }
        ctx.put(&key, &product)?;
        if occasions.is_empty() {
            return Ok(());
        }
        // Only this product's audience is read.
        let fresh_after = u.occurred_at - VIEW_INTEREST_DAYS * DAY;
        let mut audience: std::collections::BTreeMap<String, Interest> = Default::default();
        let views = format!("v/{}/", u.product_id);
        for (key, viewed_at) in ctx.scan::<Millis>(&views)? {
            if viewed_at < fresh_after {
                ctx.delete(&key);
                continue;
            }
            let customer = key.strip_prefix(&views).unwrap_or_default().to_string();
            audience.entry(customer).or_default().viewed_at = Some(viewed_at);
        }
        let wishes = format!("w/{}/", u.product_id);
        for (key, _) in ctx.scan::<bool>(&wishes)? {
            let customer = key.strip_prefix(&wishes).unwrap_or_default().to_string();
            audience.entry(customer).or_default().wishlisted = true;
        }
        for (customer, interest) in audience {
            for (kind, old, new) in &occasions {
                if *kind == ProductOccasionKind::back_in_stock && !interest.wishlisted {
                    continue;
                }
                let occasion = ProductOccasion {
                    occasion_id: deterministic_id(&[&u.event_id, &customer, &format!("{kind:?}")]),
                    customer_id: customer.clone(),
                    product_id: u.product_id.clone(),
                    product_name: product.name.clone(),
                    kind: *kind,
                    old_price: *old,
                    new_price: *new,
                    cause_event_id: u.event_id.clone(),
                    occurred_at: u.occurred_at,
                };
                ctx.emit(&self.occasions_topic, &customer, &occasion);
            }
        }
        Ok(())
    }

    fn apply_interest(&mut self, ctx: &mut Ctx<'_>, i: &ProductInterest) -> anyhow::Result<()> {
        // Blind writes, no read: views and wishlists live under separate keys, so the
        // hot path (a customer viewing a product) is a single put.
        let suffix = format!("{}/{}", i.product_id, i.customer_id);
        match i.kind {
            InterestKind::viewed => ctx.put(&format!("v/{suffix}"), &i.occurred_at),
            InterestKind::wishlisted => ctx.put(&format!("w/{suffix}"), &true),
            InterestKind::unwishlisted => {
                ctx.delete(&format!("w/{suffix}"));
                Ok(())
            }
        }
    }
}

impl Processor for CatalogJoin {
    type Input = CatalogInput;

    fn name(&self) -> &str {
        "catalog"
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.catalog_topic.clone(), self.interest_topic.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.occasions_topic.clone()]
    }

    fn decode(&self, record: &Record<'_>) -> Result<CatalogInput, Rejection> {
        if record.topic == self.catalog_topic {
            let u: CatalogUpdate =
                decode_input(record.payload, schemas::catalog_update(), &self.registry)?;
            if u.product_id.trim().is_empty() || u.event_id.trim().is_empty() {
                return Err(Rejection::new(
                    DeadLetterReason::missing_field,
                    "catalog update needs event_id and product_id",
                ));
            }
            Ok(CatalogInput::Update(Box::new(u)))
        } else {
            Ok(CatalogInput::Interest(Box::new(decode_internal(
                record.payload,
            )?)))
        }
    }

    fn event_time(&self, input: &CatalogInput) -> Option<Millis> {
        Some(match input {
            CatalogInput::Update(u) => u.occurred_at,
            CatalogInput::Interest(i) => i.occurred_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: CatalogInput) -> anyhow::Result<()> {
        match input {
            CatalogInput::Update(u) => self.apply_update(ctx, &u),
            CatalogInput::Interest(i) => self.apply_interest(ctx, &i),
        }
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<'_>, _timer: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs the catalog join until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<kairos_core::admin::AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = CatalogJoin::new(&config, registry.clone());
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}
