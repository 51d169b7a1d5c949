-- Sign in with Apple's server-to-server notifications (RELIABILITY A-07): each one is kept by
-- its token id (`jti`), so a repeated delivery changes nothing, with what it did.
CREATE TABLE tollhouse.apple_notifications (
    jti text NOT NULL,
    type text NOT NULL,
    subject text NOT NULL,
    event_time timestamptz,
    user_id uuid,
    outcome text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT apple_notifications_pkey PRIMARY KEY (jti),
    CONSTRAINT apple_notifications_outcome_check
        CHECK (outcome IN ('applied', 'unknown_subject', 'ignored'))
);
CREATE INDEX apple_notifications_subject_idx ON tollhouse.apple_notifications (subject);

ALTER TABLE tollhouse.apple_notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE tollhouse.apple_notifications FORCE ROW LEVEL SECURITY;
CREATE POLICY apple_notifications_service ON tollhouse.apple_notifications
    TO tollhouse_service USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON tollhouse.apple_notifications TO tollhouse_service;

-- Whether mail to an address arrives: Apple's relay stops forwarding when its user turns
-- forwarding off (`email-disabled`) and starts again on `email-enabled`. `deliverable_as_of`
-- is the time of the event that set it, so an older event arriving later changes nothing.
ALTER TABLE tollhouse.user_emails
    ADD COLUMN deliverable boolean NOT NULL DEFAULT true,
    ADD COLUMN deliverable_as_of timestamptz;
