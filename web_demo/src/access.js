// Access tokens for a server run with --auth-required: the page takes one from ?token= and sends it on the
// websocket (y-websocket's params: ?token=) and on HTTP API calls (Authorization: Bearer). The server checks
// it; the page only reads the token's claims to show a read-only token as read-only.

/** The token in the page's URL, or null. */
export const pageToken = () => new URLSearchParams(location.search).get('token')

/** Whether `token` grants read-only access (its claims, unverified: the server enforces them). */
export function readOnlyToken (token) {
  try {
    const payload = token.split('.')[0].replace(/-/g, '+').replace(/_/g, '/')
    return JSON.parse(atob(payload)).access === 'ro'
  } catch {
    return false
  }
}

/** fetch() options with the token, if any. */
export const withToken = (token, options = {}) =>
  token ? { ...options, headers: { ...options.headers, Authorization: `Bearer ${token}` } } : options
