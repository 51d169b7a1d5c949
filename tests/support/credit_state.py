"""A tenant's credits as comparable text: the account, its grants and its ledger rows in id
order (plan-change grant ids and the grant a ledger row names reduced to their position), for
tests that run two code paths on the same state and compare what they left."""

#: Three columns of a SELECT list; the tenant is the parameter `t`.
CREDIT_STATE = """
       (SELECT row(plan, balance, reserved, overdraft_limit, daily_cap, daily_used,
                   period_start, period_end, allowance_for)::text
        FROM tollhouse.credit_accounts WHERE tenant_id = %(t)s),
       (SELECT array_agg(row(source, regexp_replace(source_id, '^plan-change:.*', 'plan-change'),
                             total, remaining, priority, expires_at)::text ORDER BY id)
        FROM tollhouse.credit_grants WHERE tenant_id = %(t)s),
       (SELECT array_agg(row(l.kind, l.reason, l.delta, l.balance_after, l.acting_user_id,
                             (SELECT count(*) FROM tollhouse.credit_grants g
                              WHERE g.tenant_id = l.tenant_id AND g.id <= l.grant_id))::text
                         ORDER BY l.id)
        FROM tollhouse.credit_ledger l WHERE l.tenant_id = %(t)s)"""
