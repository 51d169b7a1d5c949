-- The import of issue 7, faster. A run's batches apply users in user_id order (not file
-- order), so each batch writes one narrow slice of the many indexes keyed by a user id:
-- far fewer pages touched per batch, and fewer full-page images after each checkpoint.
-- Who gets a Stripe customer is decided at staging, so the dry run can report it. The slug
-- index holds slugs only (a personal tenant has none).

-- The order a run applies its staged records in: users to create or update by user_id,
-- then merged identities; batches are ranges of it. The staged rows of a run an earlier
-- version left open keep their file order.
ALTER TABLE tollhouse.import_staging ADD COLUMN apply_no integer;
UPDATE tollhouse.import_staging SET apply_no = record_no;
ALTER TABLE tollhouse.import_staging ALTER COLUMN apply_no SET NOT NULL;
ALTER TABLE tollhouse.import_staging DROP CONSTRAINT import_staging_pkey;
ALTER TABLE tollhouse.import_staging
    ADD CONSTRAINT import_staging_pkey PRIMARY KEY (run_id, apply_no);

-- The billing step reads the personal tenant of every user it bills from the staged row;
-- rows staged by an earlier version have it for new users only.
UPDATE tollhouse.import_staging s SET tenant_id = t.id
FROM tollhouse.tenants t
WHERE s.outcome = 'updated' AND t.owner_user_id = s.target_user_id AND t.is_default;

-- Whether the record's Stripe customer is routed to its user's tenant: false when another
-- tenant has it already or an earlier record of the file names it (reported as the
-- warning customer_linked_elsewhere; the record's billing rows are not written).
ALTER TABLE tollhouse.import_staging
    ADD COLUMN customer_owner boolean NOT NULL DEFAULT true;

-- NULL slugs never clash: the index needs only the organisations' slugs.
DROP INDEX tollhouse.tenants_slug_key;
CREATE UNIQUE INDEX tenants_slug_key ON tollhouse.tenants (slug) WHERE slug IS NOT NULL;
