-- A paid invoice whose plan could not be told (its line names a price by id only, the
-- price is unknown here, and its subscription has not arrived) is stored `failed`. When one
-- of its customer's subscriptions is stored, the service retries the customer's invoices
-- that failed so (billing/queries.sql `failed_on_subscription`). Each receive call asks,
-- for every subscription it applied, whether such invoices wait: this index keeps that
-- question an index probe of the few failed events, whatever the table's size.
CREATE INDEX billing_events_failed_idx ON tollhouse.billing_events (customer_id, event_created)
    WHERE status = 'failed';
