"""The one exception tree of Tollhouse.

Every error the library raises on purpose is a `TollhouseError`. Each leaf is named after
the domain fact, carries a stable machine-readable `code` and structured `fields`, and its
docstring is its default message. Adapters map leaves to HTTP statuses (see
`tollhouse.api.errors`) or to CLI exit codes; nothing else inspects messages.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TollhouseError(Exception):
    """An unexpected Tollhouse error."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.fields = fields
        super().__init__(self.message)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}({self.message!r}{extra})"


# --- configuration and start-up -------------------------------------------------------------


class ConfigurationError(TollhouseError):
    """The configuration is invalid."""

    code = "configuration_error"


class DataDirError(ConfigurationError):
    """The data directory cannot be used."""

    code = "data_dir_unusable"


class PortInUse(TollhouseError):
    """The address to listen on is already in use."""

    code = "port_in_use"


class UnsafeDatabaseSettings(TollhouseError):
    """The database server is configured so that committed money could be lost."""

    code = "unsafe_database_settings"


# --- database -------------------------------------------------------------------------------


class DatabaseError(TollhouseError):
    """The database failed to answer."""

    code = "database_error"


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached."""

    code = "database_unavailable"


class EmbeddedDatabaseNotRunning(DatabaseError):
    """The embedded database is not running."""

    code = "embedded_database_not_running"


class MigrationError(DatabaseError):
    """The database schema cannot be brought up to date."""

    code = "migration_error"


class MigrationChecksumMismatch(MigrationError):
    """An applied migration's file has changed since it was applied."""

    code = "migration_checksum_mismatch"


class UnknownMigrationApplied(MigrationError):
    """The database has a migration this version of Tollhouse does not know."""

    code = "unknown_migration_applied"


class MigrationsPending(MigrationError):
    """The database has migrations still to apply."""

    code = "migrations_pending"


class UniqueViolation(DatabaseError):
    """A uniqueness rule was broken."""

    code = "conflict"


class ConstraintViolation(DatabaseError):
    """A rule of the data model was broken."""

    code = "constraint_violation"


class SerializationRetriesExhausted(DatabaseError):
    """The transaction kept conflicting with concurrent ones; try again."""

    code = "transaction_conflict"


# --- requests ---------------------------------------------------------------------------------


class NotFound(TollhouseError):
    """The resource does not exist."""

    code = "not_found"


class InvalidRequest(TollhouseError):
    """The request is invalid."""

    code = "invalid_request"


class Unauthenticated(TollhouseError):
    """A valid service API key is required."""

    code = "unauthenticated"


# --- service API keys -----------------------------------------------------------------------


class ApiKeyNotFound(NotFound):
    """No such service API key."""

    code = "api_key_not_found"


class ApiKeyNameTaken(UniqueViolation):
    """An active service API key already has this name."""

    code = "api_key_name_taken"


# --- generic request outcomes -----------------------------------------------------------------


class Conflict(TollhouseError):
    """The request conflicts with the current state."""

    code = "conflict_with_state"


class Forbidden(TollhouseError):
    """The caller may not do this."""

    code = "forbidden"


class TooManyRequests(TollhouseError):
    """Too many attempts; wait and try again."""

    code = "too_many_requests"


# --- identity -------------------------------------------------------------------------------


class UserNotFound(NotFound):
    """No such user."""

    code = "user_not_found"


class InvalidEmail(InvalidRequest):
    """The e-mail address is not valid."""

    code = "invalid_email"


class InvalidPassword(InvalidRequest):
    """The password does not meet the length rules."""

    code = "invalid_password"


class InvalidProfile(InvalidRequest):
    """A profile field is not valid."""

    code = "invalid_profile"


class EmailTaken(Conflict):
    """The e-mail address belongs to another user."""

    code = "email_taken"


class UsernameTaken(Conflict):
    """The username belongs to another user."""

    code = "username_taken"


class EmailNotFound(NotFound):
    """The user has no such e-mail address."""

    code = "email_not_found"


class PrimaryEmailRequired(Conflict):
    """The primary e-mail address cannot be removed; make another one primary first."""

    code = "primary_email_required"


class EmailNotVerified(Conflict):
    """Only a verified e-mail address can become primary."""

    code = "email_not_verified"


class InvalidCredentials(Unauthenticated):
    """The e-mail address or the password is wrong."""

    code = "invalid_credentials"


class AccountDisabled(Forbidden):
    """This account cannot sign in."""

    code = "account_disabled"


class TooManySignInAttempts(TooManyRequests):
    """Too many sign-in attempts; wait a few minutes or use another way to sign in."""

    code = "too_many_attempts"


class InvalidSession(Unauthenticated):
    """The session token is unknown, expired or revoked."""

    code = "invalid_session"


class ReauthenticationRequired(Forbidden):
    """Sign in again (within the last 5 minutes) to do this."""

    code = "reauthentication_required"


class InvalidToken(InvalidRequest):
    """The token is unknown or malformed."""

    code = "invalid_token"


class TokenExpired(InvalidToken):
    """The token has expired."""

    code = "token_expired"


class TokenUsed(InvalidToken):
    """The token was already used."""

    code = "token_used"


class ProviderNotConfigured(InvalidRequest):
    """Sign-in with this provider is not configured."""

    code = "provider_not_configured"


class IdentityTaken(Conflict):
    """This identity is linked to another user."""

    code = "identity_taken"


class AccountExistsLinkRequired(Conflict):
    """An account with this e-mail address exists: sign in with your existing method, then
    link this provider from your account."""

    code = "account_exists_link_required"


class VerifiedEmailRequired(Forbidden):
    """Verify an e-mail address of this account before linking another sign-in method."""

    code = "verified_email_required"


class LinkNonceRequired(Forbidden):
    """Link with a nonce from POST /v1/me/identities/nonce: this service requires one."""

    code = "link_nonce_required"


class LinkNonceInvalid(Forbidden):
    """This link nonce was given to another session, was used already, or has expired."""

    code = "link_nonce_invalid"


class LastCredential(Conflict):
    """This is the last way to sign in; add another before removing it."""

    code = "last_credential"


class IdentityNotFound(NotFound):
    """The user has no such identity."""

    code = "identity_not_found"


class IdTokenRejected(Unauthenticated):
    """The ID token was rejected."""

    code = "id_token_invalid"


class IdTokenMalformed(IdTokenRejected):
    """The ID token is not a well-formed JWT."""

    code = "id_token_malformed"


class IdTokenAlgorithm(IdTokenRejected):
    """The ID token's signing algorithm is not accepted."""

    code = "id_token_algorithm_not_allowed"


class IdTokenUnknownKey(IdTokenRejected):
    """The ID token is signed with a key the provider does not publish."""

    code = "id_token_unknown_key"


class IdTokenSignature(IdTokenRejected):
    """The ID token's signature does not verify."""

    code = "id_token_bad_signature"


class IdTokenIssuer(IdTokenRejected):
    """The ID token comes from an unexpected issuer."""

    code = "id_token_wrong_issuer"


class IdTokenAudience(IdTokenRejected):
    """The ID token was issued for another client."""

    code = "id_token_wrong_audience"


class IdTokenExpired(IdTokenRejected):
    """The ID token has expired."""

    code = "id_token_expired"


class IdTokenNotYetValid(IdTokenRejected):
    """The ID token was issued in the future."""

    code = "id_token_issued_in_future"


class IdTokenClaims(IdTokenRejected):
    """The ID token lacks a required claim or has a malformed one."""

    code = "id_token_bad_claims"


class NonceMissing(IdTokenRejected):
    """A nonce is required for this sign-in."""

    code = "nonce_missing"


class NonceMismatch(IdTokenRejected):
    """The nonce does not match the ID token."""

    code = "nonce_mismatch"


class NonceReplayed(IdTokenRejected):
    """This ID token's nonce was already used."""

    code = "nonce_replayed"


class ProviderUnavailable(TollhouseError):
    """The identity provider's keys could not be fetched; try again."""

    code = "provider_unavailable"


# --- credits --------------------------------------------------------------------------------


class PaymentRequired(TollhouseError):
    """Payment is required."""

    code = "payment_required"


class InsufficientCredits(PaymentRequired):
    """Not enough credits for this debit."""

    code = "insufficient_credits"


class DailyCapExceeded(TooManyRequests):
    """This debit would exceed the daily cap."""

    code = "daily_cap_exceeded"


class IdempotencyConflict(Conflict):
    """This idempotency key was used with a different request."""

    code = "idempotency_conflict"


class PayerNotFound(NotFound):
    """No such user or tenant."""

    code = "payer_not_found"


class ReservationNotFound(NotFound):
    """No reservation for this turn."""

    code = "reservation_not_found"


class ReservationCommitted(Conflict):
    """The reservation was already committed with another amount."""

    code = "reservation_committed"


class ReservationReleased(Conflict):
    """The reservation was already released."""

    code = "reservation_released"


class ReservationExpired(Conflict):
    """The reservation expired; its credits went back."""

    code = "reservation_expired"


class CommitExceedsReservation(InvalidRequest):
    """A commit may not exceed the reserved amount."""

    code = "commit_exceeds_reservation"


class TurnIdReserved(InvalidRequest):
    """Turn ids starting with 'adjustment:' are kept for adjustments."""

    code = "turn_id_reserved"


class LedgerEntryNotFound(NotFound):
    """No such debit in the ledger."""

    code = "ledger_entry_not_found"


class RefundExceedsDebit(InvalidRequest):
    """A refund may not exceed the debit it refunds."""

    code = "refund_exceeds_debit"


class ServiceStopping(DatabaseUnavailable):
    """The service is stopping; try again in a moment."""

    code = "service_stopping"


class PlanNotFound(NotFound):
    """No such plan."""

    code = "plan_not_found"


class MemberLimitExceeded(Forbidden):
    """This member's credit limit in the organisation would be exceeded."""

    code = "member_limit_exceeded"


class NotAMember(Forbidden):
    """The acting user is not a member of this organisation."""

    code = "not_a_member"


# --- organisations --------------------------------------------------------------------------


class Gone(TollhouseError):
    """The resource existed but can no longer be used."""

    code = "gone"


class OrganisationNotFound(NotFound):
    """No such organisation."""

    code = "organisation_not_found"


class SlugTaken(Conflict):
    """Another organisation has this slug."""

    code = "slug_taken"


class PersonalTenant(Conflict):
    """A personal tenant cannot be deleted or get other members."""

    code = "personal_tenant"


class LastOwner(Conflict):
    """An organisation keeps at least one owner."""

    code = "last_owner"


class OrganisationPermissionDenied(Forbidden):
    """Your role in this organisation does not allow this."""

    code = "organisation_permission_denied"


class MemberNotFound(NotFound):
    """This user is not a member of the organisation."""

    code = "member_not_found"


class AlreadyMember(Conflict):
    """This user or address is already a member of the organisation."""

    code = "already_member"


class InvitationNotFound(NotFound):
    """No such invitation."""

    code = "invitation_not_found"


class InvitationExpired(Gone):
    """This invitation has expired; ask for a new one."""

    code = "invitation_expired"


class InvitationRevoked(Gone):
    """This invitation was revoked."""

    code = "invitation_revoked"


class InvitationUsed(Conflict):
    """This invitation has already been accepted."""

    code = "invitation_already_used"


class InvitationSuperseded(Conflict):
    """A newer invitation to this address is pending; resend or revoke that one."""

    code = "invitation_superseded"


class InvitationEmailMismatch(Forbidden):
    """This invitation was sent to another address; sign in with a verified e-mail that
    matches it."""

    code = "invitation_email_mismatch"


# --- billing --------------------------------------------------------------------------------


class InvalidWebhookSignature(TollhouseError):
    """The Stripe-Signature header is missing, malformed, stale or does not match."""

    code = "invalid_signature"


class InvalidWebhookPayload(TollhouseError):
    """The webhook body is not a Stripe event."""

    code = "invalid_payload"


class WebhookNotConfigured(TollhouseError):
    """No Stripe webhook secret is configured (TOLLHOUSE_STRIPE_WEBHOOK_SECRET)."""

    code = "webhook_not_configured"


class StripeNotConfigured(TollhouseError):
    """No Stripe API key is configured (TOLLHOUSE_STRIPE_API_KEY)."""

    code = "stripe_not_configured"


class StripeUnavailable(TollhouseError):
    """Stripe did not answer as expected; try again."""

    code = "stripe_unavailable"


class BillingEventNotFound(NotFound):
    """No such billing event."""

    code = "billing_event_not_found"


class AlreadySubscribed(Conflict):
    """The tenant already has a current subscription: its plan changes in the portal."""

    code = "already_subscribed"


class PriceNotFound(InvalidRequest):
    """No such price, or it sells nothing Tollhouse knows (no tollhouse_* metadata)."""

    code = "unknown_price"


# --- legacy import --------------------------------------------------------------------------


class ImportFileRejected(InvalidRequest):
    """The file cannot be imported as a whole (nothing was written)."""

    code = "import_file_rejected"


class ImportInProgress(Conflict):
    """Another process is importing this file with these options right now."""

    code = "import_in_progress"
