-- A paid invoice whose plan could not be told (its price unknown here or selling nothing,
-- and its subscription not stored) is stored `failed`. When its subscription is stored, the
-- service applies it again (billing/queries.sql `failed_on_subscription`), after the commit
-- of the receive call whose `billing_heals_v1` answered true for the customer.
--
-- The invoice's failure and its subscription's application are made to meet: the failure
-- is applied in a subtransaction whose rollback released the customer's lock, so
-- `billing_heals_v1` takes that lock again, to the commit. A subscription's call waiting
-- for it then asks afterwards, with a snapshot of its own (VOLATILE: the receive
-- statement's snapshot is older), whether invoices of the customer failed so; a
-- subscription committed before the lock was taken again is found by the invoice's side
-- after its commit. Either way one side sees the other.
CREATE INDEX billing_events_failed_idx ON tollhouse.billing_events (customer_id, event_created)
    WHERE status = 'failed';

CREATE FUNCTION tollhouse.billing_heals_v1(
    p_type text, p_status text, p_error text, p_customer text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_customer IS NULL THEN
        RETURN false;
    ELSIF p_status = 'failed' AND starts_with(p_type, 'invoice.')
          AND starts_with(p_error, 'unknown price ') THEN
        PERFORM tollhouse.billing_route_v1(p_customer);  -- the customer's lock, to the commit
        RETURN true;
    ELSIF p_status = 'processed' AND starts_with(p_type, 'customer.subscription.') THEN
        RETURN EXISTS (
            SELECT 1 FROM tollhouse.billing_events f
            WHERE f.status = 'failed' AND f.customer_id = p_customer
              AND starts_with(f.type, 'invoice.')
              AND starts_with(f.last_error, 'unknown price '));
    END IF;
    RETURN false;
END
$$;
REVOKE ALL ON FUNCTION tollhouse.billing_heals_v1(text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.billing_heals_v1(text, text, text, text)
    TO tollhouse_service;
