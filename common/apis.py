"""The API's own endpoint outside any app: a username and password for the API token."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from .authentication import TokenAuthentication
from .parsers import FormParser, JSONParser
from .schema import error_responses
from .throttling import LoginThrottle, LoginUsernameThrottle


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False)

    class Meta:
        ref_name = "Credentials"


class TokenOutputSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Send it as `Authorization: Token <token>`.")

    class Meta:
        ref_name = "Token"


class ObtainTokenApi(APIView):
    """A username and password for the user's API token (created on first use)."""

    authentication_classes: list = []  # no session: no CSRF check on a login form
    permission_classes = [AllowAny]
    parser_classes = [JSONParser, FormParser]
    # Password guessing: attempts per client address and per username.
    throttle_classes = [LoginThrottle, LoginUsernameThrottle]

    @extend_schema(
        operation_id="auth_token_create",
        summary="Get your API token",
        description="Exchanges a username and password for the API token (the same token "
        "every time). Send it as `Authorization: Token <token>` or `Bearer <token>`. "
        "A form-encoded body works too.",
        tags=["Authentication"],
        # Form-encoded bodies (curl -d username=...) are taken too; JSON is the contract.
        request={"application/json": TokenRequestSerializer},
        responses={
            200: TokenOutputSerializer,
            **error_responses(401, _401="Wrong username or password, or an inactive user."),
        },
    )
    def post(self, request):
        data = TokenRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = authenticate(request=request._request, **data.validated_data)
        if user is None or not user.is_active:
            raise exceptions.AuthenticationFailed("Wrong username or password.")
        token, _ = Token.objects.get_or_create(user=user)
        return Response(TokenOutputSerializer({"token": token.key}).data)

    def get_authenticate_header(self, request) -> str:
        # A 401 names how to authenticate next time (DRF would turn it into a 403 without).
        return TokenAuthentication().authenticate_header(request)
