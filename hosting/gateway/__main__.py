from hosting.gateway.app import main

main()
