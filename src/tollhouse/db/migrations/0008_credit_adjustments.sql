-- Admin adjustments of a tenant's credits, either way, each with a note and an id that makes
-- it happen once. A positive one is a grant (source `adjustment`); a negative one takes
-- credits like a debit, past the daily cap and member limits but never past the floor, and
-- does not count as the day's usage.

CREATE TABLE tollhouse.credit_adjustments (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    adjustment_id text NOT NULL,
    amount bigint NOT NULL,
    note text NOT NULL,
    acting_user_id uuid,
    ledger_id uuid NOT NULL,
    balance_after bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_adjustments_pkey PRIMARY KEY (tenant_id, adjustment_id),
    CONSTRAINT credit_adjustments_id_check CHECK (char_length(adjustment_id) BETWEEN 1 AND 200),
    CONSTRAINT credit_adjustments_amount_check CHECK (amount <> 0),
    CONSTRAINT credit_adjustments_note_check CHECK (char_length(btrim(note)) BETWEEN 1 AND 500)
);

CREATE FUNCTION tollhouse.credit_adjust_v1(
    p_tenant uuid, p_user uuid, p_delta bigint, p_adjustment_id text, p_note text
) RETURNS tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a tollhouse.credit_accounts;
    v_tenant uuid;
    prior tollhouse.credit_adjustments;
    r tollhouse.credit_debit_result;
    v_grant uuid;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_delta, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    SELECT * INTO prior FROM tollhouse.credit_adjustments
    WHERE tenant_id = v_tenant AND adjustment_id = p_adjustment_id;
    IF FOUND THEN
        IF prior.amount <> p_delta THEN
            RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_delta, NULL, false)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, 'applied', NULL, prior.ledger_id, prior.amount, prior.balance_after,
                   true)::tollhouse.credit_debit_result;
    END IF;

    IF p_delta > 0 THEN
        v_grant := tollhouse.credit_apply_grant_v1(
            v_tenant, p_delta, 'adjustment', 'adjustment:' || p_adjustment_id, 0, NULL,
            'adjustment', p_user);
        SELECT v_tenant, 'applied', NULL, l.id, p_delta, l.balance_after, false
        INTO r FROM tollhouse.credit_ledger l
        WHERE l.tenant_id = v_tenant AND l.grant_id = v_grant AND l.kind = 'grant';
    ELSE
        -- As a debit of the turn `adjustment:<id>` (a refusal is sticky like any debit's),
        -- deciding past the cap and member limits (p_reserved), then not counted as usage.
        r := tollhouse.credit_debit_v1(
            v_tenant, NULL, -p_delta, 'adjustment:' || p_adjustment_id, NULL, 'adjustment',
            jsonb_build_object('note', p_note, 'acting_user_id', p_user), true, true);
        IF r.status <> 'applied' OR r.replayed THEN
            RETURN ROW(r.tenant_id, r.status, r.code, r.ledger_id, p_delta, r.balance_after,
                       r.replayed)::tollhouse.credit_debit_result;
        END IF;
        UPDATE tollhouse.credit_accounts
        SET daily_used = greatest(0, daily_used + p_delta)
        WHERE tenant_id = v_tenant;
        r.amount := p_delta;
    END IF;
    INSERT INTO tollhouse.credit_adjustments
        (tenant_id, adjustment_id, amount, note, acting_user_id, ledger_id, balance_after)
    VALUES (v_tenant, p_adjustment_id, p_delta, p_note, p_user, r.ledger_id, r.balance_after);
    RETURN r;
END
$$;

ALTER TABLE tollhouse.credit_adjustments ENABLE ROW LEVEL SECURITY;
ALTER TABLE tollhouse.credit_adjustments FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_adjustments_service ON tollhouse.credit_adjustments TO tollhouse_service
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT ON tollhouse.credit_adjustments TO tollhouse_service;
CREATE POLICY credit_adjustments_member_read ON tollhouse.credit_adjustments FOR SELECT
    TO tollhouse_user USING (EXISTS (
        SELECT 1 FROM tollhouse.tenant_members m
        WHERE m.tenant_id = credit_adjustments.tenant_id
          AND m.user_id = (SELECT tollhouse.current_user_id())));
GRANT SELECT ON tollhouse.credit_adjustments TO tollhouse_user;

REVOKE ALL ON FUNCTION tollhouse.credit_adjust_v1(uuid, uuid, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.credit_adjust_v1(uuid, uuid, bigint, text, text)
    TO tollhouse_service;
