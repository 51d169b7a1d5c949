-- Events read from Stripe's API (`tollhouse stripe sync` pages /v1/events, RELIABILITY W-12)
-- are stored and applied like deliveries, marked `source = 'api'`. Their body is our
-- serialisation, not the one Stripe signed, so a later webhook delivery of the same id is a
-- duplicate by its id (never a conflict), and so is an API copy of an event delivered before.

ALTER TABLE tollhouse.billing_events
    ADD COLUMN source text NOT NULL DEFAULT 'webhook',
    ADD CONSTRAINT billing_events_source_check CHECK (source IN ('webhook', 'api'));

CREATE FUNCTION tollhouse.billing_receive_v2(
    p_events jsonb, p_hashes text[], p_customers text[], p_unpark boolean, p_source text)
RETURNS TABLE (stripe_event_id text, type text, status text, error text, tenant_id uuid,
               customer_id text, unpark boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ev jsonb;
    v_id text;
    v_hash text;
    v_source text;
    v_created timestamptz;
    r record;
    v_unparking boolean := false;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_hashes, 1), 0) LOOP
        ev := p_events -> (i - 1);
        v_id := ev ->> 'id';
        stripe_event_id := v_id;
        type := ev ->> 'type';
        PERFORM pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_event:' || v_id, 0));
        SELECT e.payload_hash, e.source INTO v_hash, v_source FROM tollhouse.billing_events e
        WHERE e.stripe_event_id = v_id;
        IF FOUND THEN
            error := NULL;
            tenant_id := NULL;
            customer_id := p_customers[i];
            unpark := false;
            -- An event read from the API has no body as Stripe signed it to compare: the id
            -- (Stripe's own, and the delivery's signature checked) decides.
            IF v_hash = p_hashes[i] OR v_source = 'api' OR p_source = 'api' THEN
                status := 'duplicate';
            ELSE
                INSERT INTO tollhouse.billing_event_conflicts AS c (stripe_event_id, payload_hash)
                VALUES (v_id, p_hashes[i])
                ON CONFLICT (stripe_event_id, payload_hash) DO UPDATE
                SET deliveries = c.deliveries + 1, last_at = now();
                status := 'conflict';
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_created := tollhouse.billing_ts_v1(ev -> 'created');
        SELECT * INTO r FROM tollhouse.billing_try_apply_v1(
            type, ev #> '{data,object}', coalesce(v_created, now()), p_customers[i]);
        INSERT INTO tollhouse.billing_events AS e
            (stripe_event_id, type, tenant_id, user_id, customer_id, status, payload_hash,
             payload, event_created, attempts, last_error, processed_at, source)
        VALUES (v_id, ev ->> 'type', r.tenant_id,
                (SELECT t.owner_user_id FROM tollhouse.tenants t
                 WHERE t.id = r.tenant_id AND t.is_default),
                r.customer_id, r.status, p_hashes[i], ev, v_created, 1, r.error, now(),
                p_source);
        status := r.status;
        error := r.error;
        tenant_id := r.tenant_id;
        customer_id := r.customer_id;
        unpark := r.status = 'processed' AND r.tenant_id IS NOT NULL
                  AND tollhouse.billing_parked_waiting_v1(r.customer_id, v_id);
        v_unparking := v_unparking OR unpark;
        RETURN NEXT;
    END LOOP;
    IF v_unparking AND NOT p_unpark THEN
        RAISE EXCEPTION USING ERRCODE = 'TB003', MESSAGE = 'parked events to apply';
    END IF;
END
$$;

-- The webhook path, as before.
CREATE OR REPLACE FUNCTION tollhouse.billing_receive_v1(
    p_events jsonb, p_hashes text[], p_customers text[], p_unpark boolean)
RETURNS TABLE (stripe_event_id text, type text, status text, error text, tenant_id uuid,
               customer_id text, unpark boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM tollhouse.billing_receive_v2(p_events, p_hashes, p_customers, p_unpark,
                                               'webhook')
$$;

REVOKE ALL ON FUNCTION tollhouse.billing_receive_v2(jsonb, text[], text[], boolean, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.billing_receive_v2(jsonb, text[], text[], boolean, text)
    TO tollhouse_service;
